// Validates every object of a rendered manifest stream against the Kubernetes API's OpenAPI
// schema, with npm kubernetes-models (its model for the object's apiVersion/kind, .validate()).
// It catches what a strict YAML load does not: missing required fields, enum values, formats.
//
//   node validate.mjs --modules DIR FILE|-
//
// DIR is the node_modules folder holding kubernetes-models and yaml (ops/lib/install-helm-tools
// puts them in ops/.helm-tools/node_modules). Custom resources, which kubernetes-models does not
// know, are checked against their CRD's schema in crds/<apiVersion>/<Kind>.json beside this
// script, with ajv (a kubernetes-models dependency). Prints one line per object; exits 1 when
// any object is invalid, has neither a model nor a CRD schema (an unknown apiVersion/kind is an
// error too), or the stream does not parse.
import { createRequire } from 'node:module';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const args = process.argv.slice(2);
let modules = process.env.HELM_TOOLS_DIR ? join(process.env.HELM_TOOLS_DIR, 'node_modules') : null;
let input = null;
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--modules') modules = args[++i];
  else input = args[i];
}
if (!modules || !input) {
  console.error('usage: node validate.mjs --modules NODE_MODULES_DIR FILE|-');
  process.exit(2);
}
modules = resolve(modules);
const models = join(modules, 'kubernetes-models');
if (!existsSync(join(models, 'package.json'))) {
  console.error(`kubernetes-models is not in ${modules}: run ops/lib/install-helm-tools`);
  process.exit(2);
}
const require = createRequire(join(modules, 'noop.js'));
const YAML = await import(pathToFileURL(require.resolve('yaml')).href);

const crds = join(dirname(fileURLToPath(import.meta.url)), 'crds');
let ajv = null;
async function crdValidator(file) {
  if (ajv === null) {
    const Ajv = (await import(pathToFileURL(require.resolve('ajv')).href)).default;
    const addFormats = (await import(pathToFileURL(require.resolve('ajv-formats')).href)).default;
    ajv = new Ajv({ allErrors: true, strict: false });
    addFormats.default ? addFormats.default(ajv) : addFormats(ajv);
  }
  return ajv.compile(JSON.parse(readFileSync(file, 'utf8')));
}

const text = readFileSync(input === '-' ? 0 : input, 'utf8');
const documents = YAML.parseAllDocuments(text, { uniqueKeys: true });
let invalid = 0;
let checked = 0;
let source = '(unknown)';
for (const doc of documents) {
  // The "# Source: chart/templates/x.yaml" comment above each document.
  const match = /Source: (\S+)/.exec(`${doc.commentBefore ?? ''}\n${doc.contents?.commentBefore ?? ''}`);
  if (match) source = match[1];
  if (doc.errors.length > 0) {
    invalid++;
    console.log(`invalid ${source}: YAML: ${doc.errors.map((e) => e.message).join('; ')}`);
    continue;
  }
  const object = doc.toJS();
  if (object === null || object === undefined) continue;
  checked++;
  const what = `${source} ${object.kind}/${object.metadata?.name}`;
  if (typeof object.apiVersion !== 'string' || typeof object.kind !== 'string') {
    invalid++;
    console.log(`invalid ${what}: apiVersion and kind are required`);
    continue;
  }
  const file = join(models, object.apiVersion, `${object.kind}.js`);
  const crd = join(crds, object.apiVersion, `${object.kind}.json`);
  const named = /^[A-Za-z0-9.\/]+$/.test(object.apiVersion) && /^[A-Za-z0-9]+$/.test(object.kind);
  if (named && !existsSync(file) && existsSync(crd)) {
    const validate = await crdValidator(crd);
    if (validate(object)) {
      console.log(`valid ${what} (CRD schema)`);
    } else {
      invalid++;
      console.log(`invalid ${what}: CRD schema: ${validate.errors.map((e) => `${e.instancePath || '/'} ${e.message}`).join('; ')}`);
    }
    continue;
  }
  if (!named || !existsSync(file)) {
    invalid++;
    console.log(`invalid ${what}: kubernetes-models has no model for ${object.apiVersion} ${object.kind}`);
    continue;
  }
  const Model = (await import(pathToFileURL(file).href))[object.kind];
  try {
    new Model(object).validate();
    console.log(`valid ${what}`);
  } catch (e) {
    invalid++;
    console.log(`invalid ${what}: ${e.message}`);
  }
}
console.log(`${checked} objects, ${invalid} invalid`);
process.exit(invalid > 0 || checked === 0 ? 1 : 0);
