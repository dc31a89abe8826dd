package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/xeipuuv/gojsonschema"
	"sigs.k8s.io/yaml"
)

// chart is a chart directory as helm loads it (without subcharts).
type chart struct {
	Dir      string
	Metadata map[string]interface{} // .Chart: Chart.yaml with helm's capitalised field names
	Name     string
	Values   map[string]interface{}
	Schema   []byte            // values.schema.json, nil when the chart has none
	Files    map[string]string // every template, by its helm name (NAME/templates/x.yaml)
	Notes    string            // helm name of templates/NOTES.txt, "" when absent
}

// Chart.yaml field names as helm's chart.Metadata exposes them to templates.
var metadataNames = map[string]string{
	"apiVersion": "APIVersion", "name": "Name", "version": "Version", "kubeVersion": "KubeVersion",
	"description": "Description", "type": "Type", "keywords": "Keywords", "home": "Home",
	"sources": "Sources", "dependencies": "Dependencies", "maintainers": "Maintainers",
	"icon": "Icon", "appVersion": "AppVersion", "deprecated": "Deprecated", "annotations": "Annotations",
}

func loadChart(dir string) (*chart, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "Chart.yaml"))
	if err != nil {
		return nil, fmt.Errorf("not a chart: %w", err)
	}
	var meta map[string]interface{}
	if err := yaml.UnmarshalStrict(raw, &meta); err != nil {
		return nil, fmt.Errorf("Chart.yaml: %w", err)
	}
	c := &chart{Dir: dir, Metadata: map[string]interface{}{}, Files: map[string]string{}}
	for k, v := range meta {
		helmName, ok := metadataNames[k]
		if !ok {
			return nil, fmt.Errorf("Chart.yaml: unknown field %q", k)
		}
		c.Metadata[helmName] = v
	}
	for _, required := range []string{"APIVersion", "Name", "Version"} {
		if s, _ := c.Metadata[required].(string); s == "" {
			return nil, fmt.Errorf("Chart.yaml: %s is required", required)
		}
	}
	if c.Metadata["APIVersion"] != "v2" {
		return nil, fmt.Errorf("Chart.yaml: apiVersion %v: only v2 charts are supported", c.Metadata["APIVersion"])
	}
	c.Name = c.Metadata["Name"].(string)

	c.Values = map[string]interface{}{}
	if raw, err := os.ReadFile(filepath.Join(dir, "values.yaml")); err == nil {
		if c.Values, err = parseValues(raw, "values.yaml"); err != nil {
			return nil, err
		}
	} else if !os.IsNotExist(err) {
		return nil, err
	}
	if raw, err := os.ReadFile(filepath.Join(dir, "values.schema.json")); err == nil {
		c.Schema = raw
	} else if !os.IsNotExist(err) {
		return nil, err
	}

	entries, err := os.ReadDir(filepath.Join(dir, "templates"))
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		if e.IsDir() {
			continue // helm reads subfolders too; this chart has none
		}
		text, err := os.ReadFile(filepath.Join(dir, "templates", e.Name()))
		if err != nil {
			return nil, err
		}
		name := c.Name + "/templates/" + e.Name()
		c.Files[name] = string(text)
		if e.Name() == "NOTES.txt" {
			c.Notes = name
		}
	}
	return c, nil
}

func parseValues(raw []byte, what string) (map[string]interface{}, error) {
	values := map[string]interface{}{}
	if err := yaml.Unmarshal(raw, &values); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if values == nil {
		values = map[string]interface{}{}
	}
	return values, nil
}

// mergeValues layers -f files, then --set, then --set-string over the chart's values.yaml, as
// helm does: maps merge key by key, anything else replaces, and a null deletes the key.
func mergeValues(base map[string]interface{}, files, sets, setStrings []string) (map[string]interface{}, error) {
	result := deepCopy(base).(map[string]interface{})
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		override, err := parseValues(raw, f)
		if err != nil {
			return nil, err
		}
		coalesce(result, override)
	}
	for _, group := range []struct {
		items    []string
		asString bool
	}{{sets, false}, {setStrings, true}} {
		for _, s := range group.items {
			override, err := parseSet(s, group.asString)
			if err != nil {
				return nil, err
			}
			coalesce(result, override)
		}
	}
	return result, nil
}

func coalesce(dst, src map[string]interface{}) {
	for k, v := range src {
		if v == nil {
			delete(dst, k)
			continue
		}
		srcMap, srcIsMap := v.(map[string]interface{})
		dstMap, dstIsMap := dst[k].(map[string]interface{})
		if srcIsMap && dstIsMap {
			coalesce(dstMap, srcMap)
		} else {
			dst[k] = deepCopy(v)
		}
	}
}

func deepCopy(v interface{}) interface{} {
	switch t := v.(type) {
	case map[string]interface{}:
		m := make(map[string]interface{}, len(t))
		for k, x := range t {
			m[k] = deepCopy(x)
		}
		return m
	case []interface{}:
		l := make([]interface{}, len(t))
		for i, x := range t {
			l[i] = deepCopy(x)
		}
		return l
	default:
		return v
	}
}

// parseSet reads `a.b.c=v[,x.y=w...]`. Like helm's strvals: integers become int64, true/false
// booleans, null deletes, {x,y} is a list; asString keeps every value a string. Backslash
// escapes a comma or a dot. Indexes (a[0]=x) are not supported.
func parseSet(s string, asString bool) (map[string]interface{}, error) {
	result := map[string]interface{}{}
	for _, assignment := range splitUnescaped(s, ',', true) {
		eq := strings.IndexByte(assignment, '=')
		if eq <= 0 {
			return nil, fmt.Errorf("--set %q: expected key=value", assignment)
		}
		key, raw := assignment[:eq], assignment[eq+1:]
		if strings.ContainsAny(key, "[]") {
			return nil, fmt.Errorf("--set %q: list indexes are not supported by helm-render", assignment)
		}
		var value interface{}
		if !asString && strings.HasPrefix(raw, "{") && strings.HasSuffix(raw, "}") {
			var list []interface{}
			for _, item := range splitUnescaped(raw[1:len(raw)-1], ',', false) {
				list = append(list, typedScalar(unescape(item)))
			}
			value = list
		} else if asString {
			value = unescape(raw)
		} else {
			value = typedScalar(unescape(raw))
		}
		path := splitUnescaped(key, '.', false)
		node := result
		for i, part := range path {
			part = unescape(part)
			if i == len(path)-1 {
				node[part] = value
				break
			}
			next, ok := node[part].(map[string]interface{})
			if !ok {
				next = map[string]interface{}{}
				node[part] = next
			}
			node = next
		}
	}
	return result, nil
}

func typedScalar(s string) interface{} {
	switch s {
	case "true":
		return true
	case "false":
		return false
	case "null":
		return nil
	}
	// helm keeps leading-zero numbers such as 0660 as strings.
	if i, err := strconv.ParseInt(s, 10, 64); err == nil && (s == "0" || !strings.HasPrefix(strings.TrimPrefix(s, "-"), "0")) {
		return i
	}
	return s
}

// splitUnescaped splits on sep not preceded by a backslash (keeping the escapes); with
// braces, separators inside {...} do not split (lists in --set).
func splitUnescaped(s string, sep byte, braces bool) []string {
	var parts []string
	depth, start := 0, 0
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '\\':
			i++
		case braces && s[i] == '{':
			depth++
		case braces && s[i] == '}' && depth > 0:
			depth--
		case s[i] == sep && depth == 0:
			parts = append(parts, s[start:i])
			start = i + 1
		}
	}
	return append(parts, s[start:])
}

func unescape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// validateSchema checks the merged values against values.schema.json, as helm install and
// helm template do, with the same library and the same kind of message.
func validateSchema(c *chart, values map[string]interface{}) error {
	if c.Schema == nil {
		return nil
	}
	result, err := gojsonschema.Validate(gojsonschema.NewBytesLoader(c.Schema), gojsonschema.NewGoLoader(values))
	if err != nil {
		return fmt.Errorf("values.schema.json: %w", err)
	}
	if result.Valid() {
		return nil
	}
	var problems []string
	for _, e := range result.Errors() {
		problems = append(problems, "- "+e.String())
	}
	sort.Strings(problems)
	return fmt.Errorf("values don't meet the specifications of the schema(s) in the following chart(s):\n%s:\n%s",
		c.Name, strings.Join(problems, "\n"))
}
