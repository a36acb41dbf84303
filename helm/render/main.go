// helm-render renders a Helm chart the way `helm template` does, for the
// subset of Helm that helm/connected-apps uses, so CI can check the chart
// on a machine where Helm itself cannot be installed.
//
// It is built from Debian's packages alone (golang-go and
// golang-github-masterminds-sprig-dev, which brings sprig, semver and the
// two YAML libraries under /usr/share/gocode/src), in GOPATH mode, with
// no network:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o helm-render ./helm/render
//
// What it reproduces of Helm 3:
//   - Chart.yaml (apiVersion v2, name, version, appVersion, kubeVersion: the
//     constraint is checked against --kube-version as Helm checks it
//     against the cluster);
//   - values: values.yaml, then each -f file, then each --set, deep-merged,
//     later wins, a null deletes a key; numbers are float64, as Helm's YAML
//     to JSON decoding makes them (so a template that formats a big number
//     or compares a value with an integer fails here as it would in Helm);
//   - the objects .Values, .Release (Name, Namespace, Service, IsInstall,
//     IsUpgrade, Revision), .Chart (the Chart.yaml fields, capitalised as
//     Helm's chart.Metadata: Name, Version, AppVersion, KubeVersion, ...),
//     .Capabilities (KubeVersion.Version/Major/Minor/GitVersion,
//     APIVersions.Has), .Files (Get, GetBytes, Lines, Glob, AsConfig,
//     AsSecrets; every file outside templates/ and the chart's own
//     metadata, less .helmignore), .Template (Name, BasePath);
//   - functions: sprig's TxtFuncMap less env and expandenv (as Helm), and
//     Helm's include, tpl, required, fail (sprig's), lookup (always an empty
//     map, as `helm template`), toYaml, fromYaml, fromYamlArray, toJson,
//     fromJson, fromJsonArray;
//   - missingkey=zero with "<no value>" erased from the output, as Helm;
//   - every file under templates/ is parsed into one template set; those
//     whose name starts with "_" are only definitions; NOTES.txt is
//     rendered (so its errors show) but is no manifest.
//
// Each manifest's output is split into YAML documents; empty ones are
// dropped; every other must parse as YAML (duplicate keys are errors) and
// have apiVersion, kind and metadata.name, or the render fails naming the
// template. Output: a multi-document YAML stream on stdout (each document
// headed by "# Source: <template>"), or one file per template under -o.
//
// Not reproduced: values.schema.json validation (scripts/check-chart.sh
// validates the merged values, written by --values-out, against it),
// subcharts, --set's list and escape syntax, and the install order of
// kinds.
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/template"

	"github.com/Masterminds/semver"
	"github.com/Masterminds/sprig"
	yaml2 "gopkg.in/yaml.v2"
	yaml3 "gopkg.in/yaml.v3"
)

// includeDepthLimit is Helm's bound on nested include of one template.
const includeDepthLimit = 1000

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var valueFiles, sets, apiVersions listFlag
	name := flag.String("name", "release-name", "release name (.Release.Name)")
	namespace := flag.String("namespace", "default", "release namespace (.Release.Namespace)")
	kubeVersion := flag.String("kube-version", "v1.31.0", "Kubernetes version for .Capabilities.KubeVersion and Chart.yaml's kubeVersion check")
	isUpgrade := flag.Bool("is-upgrade", false, "render as an upgrade (.Release.IsUpgrade) rather than an install")
	outDir := flag.String("o", "", "write one file per template under this directory instead of stdout")
	valuesOut := flag.String("values-out", "", "also write the merged values, as JSON, to this file")
	flag.Var(&valueFiles, "f", "values file, merged over values.yaml (repeatable, later wins)")
	flag.Var(&sets, "set", "key.path=value, merged last (repeatable; one value each, commas are not separators as in Helm; true/false/null/integers are typed, the rest are strings)")
	flag.Var(&apiVersions, "api-versions", "extra API version for .Capabilities.APIVersions (repeatable)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: helm-render [flags] CHART_DIR\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	r := renderer{
		chartDir:    flag.Arg(0),
		release:     *name,
		namespace:   *namespace,
		kubeVersion: *kubeVersion,
		isUpgrade:   *isUpgrade,
		valueFiles:  valueFiles,
		sets:        sets,
		apiVersions: apiVersions,
	}
	if err := r.run(*outDir, *valuesOut); err != nil {
		fmt.Fprintf(os.Stderr, "helm-render: %v\n", err)
		os.Exit(1)
	}
}

type renderer struct {
	chartDir, release, namespace, kubeVersion string
	isUpgrade                                 bool
	valueFiles, sets, apiVersions             []string
}

// output is one rendered manifest template and the documents it made.
type output struct {
	name string
	docs []string
}

func (r *renderer) run(outDir, valuesOut string) error {
	meta, err := loadChart(r.chartDir)
	if err != nil {
		return err
	}
	chartName := meta["Name"].(string)
	caps, err := newCapabilities(r.kubeVersion, r.apiVersions)
	if err != nil {
		return err
	}
	if c, ok := meta["KubeVersion"].(string); ok && c != "" {
		constraint, err := semver.NewConstraint(c)
		if err != nil {
			return fmt.Errorf("Chart.yaml: kubeVersion %q: %w", c, err)
		}
		v, _ := semver.NewVersion(caps.KubeVersion.Version)
		if !constraint.Check(v) {
			return fmt.Errorf("chart requires kubeVersion: %s which is incompatible with Kubernetes %s", c, caps.KubeVersion.Version)
		}
	}
	values, err := r.values()
	if err != nil {
		return err
	}
	if valuesOut != "" {
		b, err := json.MarshalIndent(values, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(valuesOut, append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	files, err := loadFiles(r.chartDir)
	if err != nil {
		return err
	}
	templates, err := loadTemplates(r.chartDir, chartName)
	if err != nil {
		return err
	}

	top := map[string]interface{}{
		"Values": values,
		"Release": map[string]interface{}{
			"Name":      r.release,
			"Namespace": r.namespace,
			"Service":   "Helm",
			"IsInstall": !r.isUpgrade,
			"IsUpgrade": r.isUpgrade,
			"Revision":  1,
		},
		"Chart":        meta,
		"Capabilities": caps,
		"Files":        files,
	}

	root := template.New("gotpl").Option("missingkey=zero")
	root.Funcs(funcMap(root))
	names := make([]string, 0, len(templates))
	for n := range templates {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if _, err := root.New(n).Parse(templates[n]); err != nil {
			return fmt.Errorf("parse error in %s: %w", n, err)
		}
	}

	var outputs []output
	for _, n := range names {
		base := path.Base(n)
		if strings.HasPrefix(base, "_") {
			continue
		}
		vals := make(map[string]interface{}, len(top)+1)
		for k, v := range top {
			vals[k] = v
		}
		vals["Template"] = map[string]interface{}{
			"Name":     n,
			"BasePath": chartName + "/templates",
		}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, n, vals); err != nil {
			return fmt.Errorf("render error in %s: %s", n, cleanExecError(err))
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if base == "NOTES.txt" {
			continue
		}
		docs, err := splitDocuments(n, text)
		if err != nil {
			return err
		}
		if len(docs) > 0 {
			outputs = append(outputs, output{name: n, docs: docs})
		}
	}
	return write(outputs, outDir)
}

// values merges values.yaml, the -f files and the --set values, in order.
func (r *renderer) values() (map[string]interface{}, error) {
	values, err := readValues(filepath.Join(r.chartDir, "values.yaml"))
	if err != nil {
		return nil, err
	}
	for _, f := range r.valueFiles {
		v, err := readValues(f)
		if err != nil {
			return nil, err
		}
		merge(values, v)
	}
	for _, s := range r.sets {
		v, err := parseSet(s)
		if err != nil {
			return nil, err
		}
		merge(values, v)
	}
	return values, nil
}

// readValues reads a YAML mapping and gives it the types Helm's values have
// (YAML decoded through JSON: maps of strings, float64 numbers).
func readValues(file string) (map[string]interface{}, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	v, err := yamlToJSONTypes(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if v == nil {
		return map[string]interface{}{}, nil
	}
	m, ok := v.(map[string]interface{})
	if !ok {
		return nil, fmt.Errorf("%s: not a mapping of values", file)
	}
	return m, nil
}

func yamlToJSONTypes(b []byte) (interface{}, error) {
	var raw interface{}
	if err := yaml3.Unmarshal(b, &raw); err != nil {
		return nil, err
	}
	if raw == nil {
		return nil, nil
	}
	j, err := json.Marshal(raw)
	if err != nil {
		return nil, err
	}
	var out interface{}
	if err := json.Unmarshal(j, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// merge deep-merges src into dst: maps merge key by key, anything else in
// src replaces dst's, and a null in src deletes the key (as Helm).
func merge(dst, src map[string]interface{}) {
	for k, v := range src {
		if v == nil {
			delete(dst, k)
			continue
		}
		if sm, ok := v.(map[string]interface{}); ok {
			if dm, ok := dst[k].(map[string]interface{}); ok {
				merge(dm, sm)
				continue
			}
		}
		dst[k] = v
	}
}

func parseSet(s string) (map[string]interface{}, error) {
	eq := strings.IndexByte(s, '=')
	if eq <= 0 {
		return nil, fmt.Errorf("--set %q: want key.path=value", s)
	}
	keys := strings.Split(s[:eq], ".")
	raw := s[eq+1:]
	var value interface{} = raw
	switch {
	case raw == "true":
		value = true
	case raw == "false":
		value = false
	case raw == "null":
		value = nil
	default:
		if i, err := strconv.ParseInt(raw, 10, 64); err == nil {
			value = i
		}
	}
	out := map[string]interface{}{}
	cur := out
	for i, k := range keys {
		if k == "" {
			return nil, fmt.Errorf("--set %q: empty key", s)
		}
		if i == len(keys)-1 {
			cur[k] = value
		} else {
			next := map[string]interface{}{}
			cur[k] = next
			cur = next
		}
	}
	return out, nil
}

// loadChart reads Chart.yaml into the field names of Helm's chart.Metadata.
func loadChart(dir string) (map[string]interface{}, error) {
	b, err := os.ReadFile(filepath.Join(dir, "Chart.yaml"))
	if err != nil {
		return nil, err
	}
	v, err := yamlToJSONTypes(b)
	if err != nil {
		return nil, fmt.Errorf("Chart.yaml: %w", err)
	}
	raw, ok := v.(map[string]interface{})
	if !ok {
		return nil, errors.New("Chart.yaml: not a mapping")
	}
	if raw["apiVersion"] != "v2" {
		return nil, fmt.Errorf("Chart.yaml: apiVersion %v: only v2 charts are supported", raw["apiVersion"])
	}
	meta := map[string]interface{}{}
	for k, v := range raw {
		switch k {
		case "apiVersion":
			meta["APIVersion"] = v
		default:
			meta[strings.ToUpper(k[:1])+k[1:]] = v
		}
	}
	for _, k := range []string{"Name", "Version"} {
		if s, ok := meta[k].(string); !ok || s == "" {
			return nil, fmt.Errorf("Chart.yaml: %s is required", strings.ToLower(k))
		}
	}
	if _, err := semver.StrictNewVersion(meta["Version"].(string)); err != nil {
		return nil, fmt.Errorf("Chart.yaml: version %q is not SemVer 2: %w", meta["Version"], err)
	}
	return meta, nil
}

// KubeVersion and Capabilities mirror Helm's chartutil types.
type KubeVersion struct {
	Version    string
	Major      string
	Minor      string
	GitVersion string
}

func (k KubeVersion) String() string { return k.Version }

// VersionSet is .Capabilities.APIVersions.
type VersionSet []string

// Has is true for "group/version" and "group/version/Kind" entries given.
func (v VersionSet) Has(apiVersion string) bool {
	for _, x := range v {
		if x == apiVersion {
			return true
		}
	}
	return false
}

type Capabilities struct {
	KubeVersion KubeVersion
	APIVersions VersionSet
}

// builtinAPIVersions are the group versions of a current cluster that
// Helm's default capabilities list.
var builtinAPIVersions = []string{
	"v1", "admissionregistration.k8s.io/v1", "apiextensions.k8s.io/v1",
	"apps/v1", "authentication.k8s.io/v1", "authorization.k8s.io/v1",
	"autoscaling/v1", "autoscaling/v2", "batch/v1", "certificates.k8s.io/v1",
	"coordination.k8s.io/v1", "discovery.k8s.io/v1", "events.k8s.io/v1",
	"flowcontrol.apiserver.k8s.io/v1", "networking.k8s.io/v1", "node.k8s.io/v1",
	"policy/v1", "rbac.authorization.k8s.io/v1", "scheduling.k8s.io/v1",
	"storage.k8s.io/v1",
}

func newCapabilities(version string, extra []string) (*Capabilities, error) {
	v, err := semver.NewVersion(version)
	if err != nil {
		return nil, fmt.Errorf("--kube-version %q: %w", version, err)
	}
	full := "v" + v.String()
	return &Capabilities{
		KubeVersion: KubeVersion{
			Version:    full,
			Major:      strconv.FormatUint(v.Major(), 10),
			Minor:      strconv.FormatUint(v.Minor(), 10),
			GitVersion: full,
		},
		APIVersions: append(append(VersionSet{}, builtinAPIVersions...), extra...),
	}, nil
}

// Files is .Files: the chart's files outside templates/, by relative path.
type Files map[string][]byte

func (f Files) GetBytes(name string) []byte { return f[name] }
func (f Files) Get(name string) string      { return string(f[name]) }

func (f Files) Lines(name string) []string {
	s := string(f[name])
	if s == "" {
		return []string{}
	}
	return strings.Split(strings.TrimSuffix(s, "\n"), "\n")
}

func (f Files) Glob(pattern string) Files {
	out := Files{}
	for name, b := range f {
		if ok, _ := path.Match(pattern, name); ok {
			out[name] = b
		}
	}
	return out
}

func (f Files) AsConfig() string { return f.asMap(func(b []byte) string { return string(b) }) }

func (f Files) AsSecrets() string {
	return f.asMap(base64.StdEncoding.EncodeToString)
}

func (f Files) asMap(conv func([]byte) string) string {
	m := map[string]interface{}{}
	for name, b := range f {
		m[path.Base(name)] = conv(b)
	}
	return toYaml(m)
}

// loadFiles reads every file of the chart that Helm puts in .Files.
func loadFiles(dir string) (Files, error) {
	ignore := readHelmignore(dir)
	files := Files{}
	err := filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		rel = filepath.ToSlash(rel)
		if rel == "." {
			return nil
		}
		if info.IsDir() {
			if rel == "templates" || rel == "charts" || ignored(ignore, rel, true) {
				return filepath.SkipDir
			}
			return nil
		}
		switch rel {
		case "Chart.yaml", "values.yaml", "values.schema.json", "Chart.lock", "requirements.yaml", "requirements.lock":
			return nil
		}
		if ignored(ignore, rel, false) {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		files[rel] = b
		return nil
	})
	return files, err
}

// readHelmignore reads .helmignore's patterns (globs; a trailing "/" for
// directories only; no negation).
func readHelmignore(dir string) []string {
	b, err := os.ReadFile(filepath.Join(dir, ".helmignore"))
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		out = append(out, line)
	}
	return out
}

func ignored(patterns []string, rel string, isDir bool) bool {
	for _, p := range patterns {
		dirOnly := strings.HasSuffix(p, "/")
		p = strings.TrimSuffix(p, "/")
		if dirOnly && !isDir {
			continue
		}
		if strings.Contains(p, "/") {
			if ok, _ := path.Match(strings.TrimPrefix(p, "/"), rel); ok {
				return true
			}
		} else if ok, _ := path.Match(p, path.Base(rel)); ok {
			return true
		}
	}
	return false
}

// loadTemplates reads every file under templates/, named as Helm names
// them: "<chart>/templates/<path>".
func loadTemplates(dir, chartName string) (map[string]string, error) {
	out := map[string]string{}
	tdir := filepath.Join(dir, "templates")
	err := filepath.Walk(tdir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if info.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(tdir, p)
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		out[chartName+"/templates/"+filepath.ToSlash(rel)] = string(b)
		return nil
	})
	return out, err
}

// funcMap is sprig's, less env and expandenv, plus Helm's own functions;
// include and tpl close over the template set t they execute in.
func funcMap(t *template.Template) template.FuncMap {
	f := sprig.TxtFuncMap()
	delete(f, "env")
	delete(f, "expandenv")

	depth := map[string]int{}
	f["include"] = func(name string, data interface{}) (string, error) {
		if depth[name] > includeDepthLimit {
			return "", fmt.Errorf("rendering template has a nested reference name: %s", name)
		}
		depth[name]++
		defer func() { depth[name]-- }()
		var buf strings.Builder
		err := t.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	f["tpl"] = func(text string, vals interface{}) (string, error) {
		c, err := t.Clone()
		if err != nil {
			return "", err
		}
		c.Option("missingkey=zero")
		c.Funcs(funcMap(c))
		name := "tpl"
		if m, ok := vals.(map[string]interface{}); ok {
			if tm, ok := m["Template"].(map[string]interface{}); ok {
				if n, ok := tm["Name"].(string); ok && n != "" {
					name = n
				}
			}
		}
		if _, err := c.New(name).Parse(text); err != nil {
			return "", fmt.Errorf("cannot parse template %q: %w", text, err)
		}
		var buf strings.Builder
		if err := c.ExecuteTemplate(&buf, name, vals); err != nil {
			return "", fmt.Errorf("error during tpl function execution for %q: %w", text, err)
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}
	f["required"] = func(msg string, val interface{}) (interface{}, error) {
		if val == nil {
			return val, errors.New(msg)
		}
		if s, ok := val.(string); ok && s == "" {
			return val, errors.New(msg)
		}
		return val, nil
	}
	f["lookup"] = func(apiVersion, kind, namespace, name string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	f["toYaml"] = toYaml
	f["fromYaml"] = func(s string) map[string]interface{} {
		v, err := yamlToJSONTypes([]byte(s))
		if err != nil {
			return map[string]interface{}{"Error": err.Error()}
		}
		m, _ := v.(map[string]interface{})
		if m == nil {
			m = map[string]interface{}{}
		}
		return m
	}
	f["fromYamlArray"] = func(s string) []interface{} {
		v, err := yamlToJSONTypes([]byte(s))
		if err != nil {
			return []interface{}{err.Error()}
		}
		a, _ := v.([]interface{})
		return a
	}
	f["toJson"] = func(v interface{}) string {
		b, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return string(b)
	}
	f["fromJson"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	f["fromJsonArray"] = func(s string) []interface{} {
		var a []interface{}
		if err := json.Unmarshal([]byte(s), &a); err != nil {
			return []interface{}{err.Error()}
		}
		return a
	}
	return f
}

// toYaml is Helm's: through JSON (so keys sort and numbers print as JSON
// prints them), then YAML, without the trailing newline.
func toYaml(v interface{}) string {
	j, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	var obj interface{}
	if err := yaml2.Unmarshal(j, &obj); err != nil {
		return ""
	}
	b, err := yaml2.Marshal(obj)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(b), "\n")
}

// cleanExecError shortens a failed required or fail to Helm's form,
// "execution error at (<template>:<line>:<col>): <message>", keeping the
// innermost location of the nested include chain; other errors stay whole.
func cleanExecError(err error) string {
	text := err.Error()
	cut := -1
	for _, marker := range []string{"error calling required: ", "error calling fail: "} {
		if i := strings.LastIndex(text, marker); i >= 0 && i+len(marker) > cut {
			cut = i + len(marker)
		}
	}
	if cut < 0 {
		return text
	}
	msg := text[cut:]
	loc := ""
	if i := strings.LastIndex(text[:cut], "template: "); i >= 0 {
		rest := text[i+len("template: "):]
		if j := strings.Index(rest, ": executing"); j >= 0 {
			loc = rest[:j]
		}
	}
	return fmt.Sprintf("execution error at (%s): %s", loc, msg)
}

// splitDocuments cuts a template's output at "---" lines, drops documents
// with nothing but blanks and comments, and checks each other one.
func splitDocuments(name, text string) ([]string, error) {
	var docs []string
	var cur []string
	flush := func() error {
		start := 0
		for start < len(cur) && strings.TrimSpace(cur[start]) == "" {
			start++
		}
		doc := strings.Join(cur[start:], "\n")
		cur = cur[:0]
		if !hasContent(doc) {
			return nil
		}
		if err := checkDocument(doc); err != nil {
			return fmt.Errorf("%s: document %d: %w\n%s", name, len(docs)+1, err, numbered(doc))
		}
		docs = append(docs, strings.TrimRight(doc, " \n")+"\n")
		return nil
	}
	for _, line := range strings.Split(text, "\n") {
		if line == "---" || strings.HasPrefix(line, "--- ") || strings.HasPrefix(line, "---\t") {
			if err := flush(); err != nil {
				return nil, err
			}
			continue
		}
		cur = append(cur, line)
	}
	if err := flush(); err != nil {
		return nil, err
	}
	return docs, nil
}

func hasContent(doc string) bool {
	for _, line := range strings.Split(doc, "\n") {
		t := strings.TrimSpace(line)
		if t != "" && !strings.HasPrefix(t, "#") {
			return true
		}
	}
	return false
}

func checkDocument(doc string) error {
	var m map[string]interface{}
	if err := yaml3.Unmarshal([]byte(doc), &m); err != nil {
		return fmt.Errorf("YAML parse error: %w", err)
	}
	for _, k := range []string{"apiVersion", "kind"} {
		if s, ok := m[k].(string); !ok || s == "" {
			return fmt.Errorf("no %s", k)
		}
	}
	md, _ := m["metadata"].(map[string]interface{})
	if s, ok := md["name"].(string); !ok || s == "" {
		return errors.New("no metadata.name")
	}
	return nil
}

func numbered(doc string) string {
	var b strings.Builder
	for i, line := range strings.Split(doc, "\n") {
		fmt.Fprintf(&b, "%4d | %s\n", i+1, line)
	}
	return b.String()
}

func write(outputs []output, outDir string) error {
	if outDir == "" {
		w := os.Stdout
		for _, o := range outputs {
			for _, d := range o.docs {
				fmt.Fprintf(w, "---\n# Source: %s\n%s", o.name, d)
			}
		}
		return nil
	}
	for _, o := range outputs {
		p := filepath.Join(outDir, filepath.FromSlash(o.name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		var b strings.Builder
		for _, d := range o.docs {
			fmt.Fprintf(&b, "---\n# Source: %s\n%s", o.name, d)
		}
		if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
			return err
		}
	}
	return nil
}
