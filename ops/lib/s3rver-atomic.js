'use strict';
// Preloaded into s3rver 3.7.1 (node --require, by ops/lib/s3rver): PUT replaces an object whole or
// not at all, as S3 promises ("Amazon S3 never adds partial objects"). Stock s3rver truncates the
// object's file when a PUT starts and streams the body into it, so a GET during the PUT, or a PUT
// whose client is killed halfway, sees a short object: a store no S3 user has. Here the body goes to
// a file beside the object, which is renamed over it only once every byte the request announced has
// arrived; a cut-off PUT leaves the old object as it was (and a stray .part file, never listed).
const path = require('path');
const crypto = require('crypto');
const { createRequire } = require('module');
const { Transform } = require('stream');

// s3rver and its fs-extra, from where ops installs them (S3RVER_DIR, set by ops/lib/s3rver).
const s3rverRequire = createRequire(require.resolve('s3rver/package.json', { paths: [process.env.S3RVER_DIR || process.cwd()] }));
const fs = s3rverRequire('fs-extra');
const FilesystemStore = s3rverRequire('./lib/stores/filesystem.js');

FilesystemStore.prototype.putObject = async function putObject(object) {
  const objectPath = this.getResourcePath(object.bucket, object.key, 'object');
  await fs.mkdirp(path.dirname(objectPath));
  const partPath = `${objectPath}.part-${process.pid}-${crypto.randomBytes(6).toString('hex')}`;
  const announced = Number(object.metadata['x-amz-decoded-content-length'] ?? object.metadata['content-length']);
  let size, md5;
  try {
    [size, md5] = await new Promise((resolve, reject) => {
      const writeStream = fs.createWriteStream(partPath);
      const md5Context = crypto.createHash('md5');
      writeStream.on('error', reject);
      if (Buffer.isBuffer(object.content)) {
        md5Context.update(object.content);
        writeStream.end(object.content, () => resolve([object.content.length, md5Context.digest('hex')]));
        return;
      }
      let totalLength = 0;
      object.content.on('error', reject);
      object.content.on('aborted', () => reject(new Error('the PUT was cut off')));
      object.content
        .pipe(new Transform({
          transform(chunk, encoding, callback) {
            md5Context.update(chunk, encoding);
            totalLength += chunk.length;
            callback(null, chunk);
          },
        }))
        .pipe(writeStream)
        .on('finish', () => resolve([totalLength, md5Context.digest('hex')]));
    });
    // A multipart completion stores the parts with the metadata of the upload's initiation, which
    // announced no body (0, or nothing): only a PUT that announced bytes is held to them.
    if (Number.isFinite(announced) && announced > 0 && size !== announced) {
      throw new Error(`the PUT brought ${size} of its ${announced} bytes`);
    }
    await fs.rename(partPath, objectPath);
  } catch (err) {
    await fs.remove(partPath).catch(() => {});
    throw err;
  }
  await this.putMetadata(object.bucket, object.key, object.metadata, md5);
  return { size, md5 };
};
