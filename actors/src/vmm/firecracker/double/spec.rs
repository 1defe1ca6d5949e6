//! Firecracker's published API, read from the vendored Swagger 2.0 file, and the checks the
//! double makes of every request against it.
//!
//! Only the parts of Swagger this file uses are understood: paths with `{templates}`, one
//! `in: body` parameter per operation, and schemas made of `$ref`, `type`
//! (object/string/integer/number/boolean/array), `properties`, `required`, `items`,
//! `enum`, `minimum`, `maximum` and `additionalProperties`. A property that a schema does
//! not list is refused, because Firecracker's request types use `deny_unknown_fields`.
//! `null` is refused too: the spec declares no nullable field, so a driver must leave an
//! unset optional field out rather than send `null`. `format` (a pattern on the MMDS
//! address) is not checked.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::Value;

/// The vendored spec (Firecracker's main branch); `Spec::load` panics if this stops
/// parsing.
const SPEC_YAML: &str = include_str!("../firecracker-api.yaml");
/// The spec of the oldest Firecracker release banger supports,
/// `src/firecracker/swagger/firecracker.yaml` at tag `v1.10.0`, unchanged. A request the
/// driver sends must conform to both: a field newer than v1.10.0 is refused by a v1.10
/// Firecracker (`deny_unknown_fields`), which the double emulating it catches.
const OLDEST_YAML: &str = include_str!("../firecracker-api-v1.10.0.yaml");

/// The oldest Firecracker release banger supports.
pub const OLDEST_SUPPORTED: &str = "1.10.0";

/// Which Firecracker release's API the double answers as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Release {
    /// [`OLDEST_SUPPORTED`].
    Oldest,
    /// The newest vendored spec.
    #[default]
    Newest,
}

impl Release {
    /// `oldest` or `newest` (also the version numbers they stand for).
    pub fn parse(text: &str) -> Option<Release> {
        match text {
            "oldest" | OLDEST_SUPPORTED => Some(Release::Oldest),
            "newest" => Some(Release::Newest),
            other if other == Spec::shared().version() => Some(Release::Newest),
            _ => None,
        }
    }

    pub(crate) fn spec(self) -> &'static Spec {
        match self {
            Release::Oldest => Spec::shared_oldest(),
            Release::Newest => Spec::shared(),
        }
    }
}

/// Firecracker's published API, parsed from the vendored swagger file.
#[derive(Debug, Clone)]
pub struct Spec {
    version: String,
    /// Path template (`/drives/{drive_id}`) → lowercase method → operation.
    paths: BTreeMap<String, BTreeMap<String, Operation>>,
    definitions: BTreeMap<String, Schema>,
}

/// One method on one path.
#[derive(Debug, Clone)]
pub(crate) struct Operation {
    // Read by the test that holds the double's phase table to the spec's "Pre-boot only".
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) summary: String,
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) description: String,
    pub(crate) body: Option<BodyParam>,
    /// Status code (`"200"`, `"default"`) → schema of the answer, if it has a body.
    responses: BTreeMap<String, Option<Schema>>,
}

/// The `in: body` parameter of an operation.
#[derive(Debug, Clone)]
pub(crate) struct BodyParam {
    /// `required: true` in the spec. Firecracker refuses every PUT without a body even
    /// where the spec leaves this out; the double applies that rule itself.
    pub(crate) required: bool,
    schema: Schema,
}

/// Why a request does not fit the spec's paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RouteError {
    /// No path template matches, or none with this method.
    Unknown,
    /// The path is a templated path with its trailing id left out (`PUT /drives`).
    MissingId,
}

/// A request matched to the spec.
#[derive(Debug, Clone)]
pub(crate) struct Route<'s> {
    pub(crate) template: &'s str,
    pub(crate) operation: &'s Operation,
    /// The value of the path's `{id}` segment, if the template has one.
    pub(crate) id: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Schema {
    #[serde(rename = "$ref")]
    reference: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, Schema>,
    #[serde(default)]
    required: Vec<String>,
    items: Option<Box<Schema>>,
    #[serde(rename = "enum")]
    variants: Option<Vec<Value>>,
    minimum: Option<f64>,
    maximum: Option<f64>,
    #[serde(rename = "additionalProperties")]
    additional: Option<Additional>,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Additional {
    Any(bool),
    Schema(Box<Schema>),
}

#[derive(Debug, Deserialize)]
struct RawSpec {
    info: RawInfo,
    paths: BTreeMap<String, BTreeMap<String, RawOperation>>,
    definitions: BTreeMap<String, Schema>,
}

#[derive(Debug, Deserialize)]
struct RawInfo {
    version: String,
}

#[derive(Debug, Deserialize)]
struct RawOperation {
    #[serde(default)]
    summary: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    parameters: Vec<RawParameter>,
    #[serde(default)]
    responses: serde_yaml_ng::Mapping,
}

#[derive(Debug, Deserialize)]
struct RawParameter {
    #[serde(rename = "in")]
    location: String,
    #[serde(default)]
    required: bool,
    schema: Option<Schema>,
}

#[derive(Debug, Deserialize)]
struct RawResponse {
    schema: Option<Schema>,
}

static LOADED: OnceLock<Spec> = OnceLock::new();
static OLDEST: OnceLock<Spec> = OnceLock::new();

impl Spec {
    /// Parse the vendored YAML. Panics only if the vendored file is broken.
    pub fn load() -> Spec {
        Spec::shared().clone()
    }

    /// The spec of the oldest supported release ([`OLDEST_SUPPORTED`]).
    pub fn oldest() -> Spec {
        Spec::shared_oldest().clone()
    }

    /// The parsed spec, parsed once per process.
    pub(crate) fn shared() -> &'static Spec {
        LOADED.get_or_init(|| {
            Spec::parse(SPEC_YAML).expect("the vendored firecracker-api.yaml does not parse")
        })
    }

    pub(crate) fn shared_oldest() -> &'static Spec {
        OLDEST.get_or_init(|| {
            Spec::parse(OLDEST_YAML)
                .expect("the vendored firecracker-api-v1.10.0.yaml does not parse")
        })
    }

    fn parse(yaml: &str) -> Result<Spec, String> {
        let raw: RawSpec = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        let mut paths = BTreeMap::new();
        for (path, methods) in raw.paths {
            let mut operations = BTreeMap::new();
            for (method, raw_op) in methods {
                let body = raw_op
                    .parameters
                    .into_iter()
                    .find(|p| p.location == "body")
                    .map(|p| BodyParam {
                        required: p.required,
                        schema: p.schema.unwrap_or_default(),
                    });
                let mut responses = BTreeMap::new();
                for (code, response) in raw_op.responses {
                    let code = match code {
                        serde_yaml_ng::Value::Number(n) => n.to_string(),
                        serde_yaml_ng::Value::String(s) => s,
                        other => return Err(format!("response code {other:?} on {path}")),
                    };
                    let response: RawResponse =
                        serde_yaml_ng::from_value(response).map_err(|e| e.to_string())?;
                    responses.insert(code, response.schema);
                }
                let operation = Operation {
                    summary: raw_op.summary,
                    description: raw_op.description,
                    body,
                    responses,
                };
                operations.insert(method.to_ascii_lowercase(), operation);
            }
            paths.insert(path, operations);
        }
        let spec = Spec {
            version: raw.info.version,
            paths,
            definitions: raw.definitions,
        };
        spec.check_refs()?;
        Ok(spec)
    }

    /// Every `$ref` must name a definition, so that a broken spec fails at load time and not
    /// in the middle of a test.
    fn check_refs(&self) -> Result<(), String> {
        fn walk(spec: &Spec, schema: &Schema) -> Result<(), String> {
            if let Some(reference) = &schema.reference {
                spec.resolve(reference)?;
            }
            for property in schema.properties.values() {
                walk(spec, property)?;
            }
            if let Some(items) = &schema.items {
                walk(spec, items)?;
            }
            if let Some(Additional::Schema(additional)) = &schema.additional {
                walk(spec, additional)?;
            }
            Ok(())
        }
        for schema in self.definitions.values() {
            walk(self, schema)?;
        }
        for operation in self.paths.values().flat_map(|m| m.values()) {
            if let Some(body) = &operation.body {
                walk(self, &body.schema)?;
            }
            for schema in operation.responses.values().flatten() {
                walk(self, schema)?;
            }
        }
        Ok(())
    }

    /// `info.version`: the Firecracker version this spec describes.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The path templates of the spec, sorted.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.paths.keys().map(String::as_str)
    }

    /// The lowercase methods the spec has for `template`.
    pub fn methods(&self, template: &str) -> impl Iterator<Item = &str> {
        self.paths
            .get(template)
            .into_iter()
            .flat_map(|m| m.keys().map(String::as_str))
    }

    #[cfg(test)]
    pub(crate) fn operations(&self) -> impl Iterator<Item = (&str, &str, &Operation)> {
        self.paths.iter().flat_map(|(path, methods)| {
            methods
                .iter()
                .map(move |(method, op)| (method.as_str(), path.as_str(), op))
        })
    }

    /// Check one request against the spec: the path (with templates like
    /// `/drives/{drive_id}`) and method exist, and the JSON body conforms to the body
    /// parameter's schema. `Err` carries a message naming the field.
    pub fn validate(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(), String> {
        let route = self.route(method, path).map_err(|e| match e {
            RouteError::Unknown => {
                format!("no operation {} {path} in the spec", method_name(method))
            }
            RouteError::MissingId => format!("{path} needs an id after it"),
        })?;
        self.check_body(method, &route, body)
    }

    /// Match a request path (query string ignored) to a path template and method.
    pub(crate) fn route(&self, method: &str, path: &str) -> Result<Route<'_>, RouteError> {
        let path = path.split('?').next().unwrap_or_default();
        let method = method.to_ascii_lowercase();
        let segments: Vec<&str> = split(path).collect();
        let mut missing_id = false;
        for (template, methods) in &self.paths {
            let pattern: Vec<&str> = split(template).collect();
            let Some(operation) = methods.get(&method) else {
                continue;
            };
            if let Some(id) = matches(&pattern, &segments) {
                return Ok(Route {
                    template,
                    operation,
                    id,
                });
            }
            // `/drives` for `/drives/{drive_id}`: Firecracker answers "The ID cannot be
            // empty." rather than "Invalid request method and/or path".
            if pattern.len() == segments.len() + 1
                && pattern.last().is_some_and(|s| is_template(s))
                && pattern[..segments.len()] == segments[..]
            {
                missing_id = true;
            }
        }
        Err(if missing_id {
            RouteError::MissingId
        } else {
            RouteError::Unknown
        })
    }

    /// Check the body of a routed request against its operation.
    pub(crate) fn check_body(
        &self,
        method: &str,
        route: &Route<'_>,
        body: Option<&Value>,
    ) -> Result<(), String> {
        let method = method.to_ascii_lowercase();
        match (&route.operation.body, body) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err(format!(
                "{} {} takes no body",
                method_name(&method),
                route.template
            )),
            (Some(param), None) if param.required => Err(format!(
                "{} {} needs a body",
                method_name(&method),
                route.template
            )),
            (Some(_), None) => Ok(()),
            (Some(param), Some(body)) => {
                // PATCH /machine-config reuses MachineConfiguration in the spec, whose
                // `required` lists vcpu_count and mem_size_mib, but the spec's own text
                // ("A subset of Machine Configuration Parameters") and Firecracker's
                // MachineConfigUpdate make every field optional.
                let partial = method == "patch" && route.template == "/machine-config";
                self.check(&param.schema, body, "", partial)
            }
        }
    }

    /// Check an answer's body against the schema the spec gives for `status`.
    #[cfg(test)]
    pub(crate) fn check_response(
        &self,
        method: &str,
        path: &str,
        status: u16,
        body: &Value,
    ) -> Result<(), String> {
        let route = self
            .route(method, path)
            .map_err(|e| format!("{method} {path}: {e:?}"))?;
        let responses = &route.operation.responses;
        let schema = responses
            .get(&status.to_string())
            .or_else(|| responses.get("default"))
            .ok_or_else(|| format!("{method} {path}: no response {status} in the spec"))?
            .as_ref()
            .ok_or_else(|| format!("{method} {path}: response {status} has no body"))?;
        self.check(schema, body, "", false)
    }

    fn resolve(&self, reference: &str) -> Result<&Schema, String> {
        reference
            .strip_prefix("#/definitions/")
            .and_then(|name| self.definitions.get(name))
            .ok_or_else(|| format!("the spec's $ref {reference} names no definition"))
    }

    /// Check `value` at `at` (a dotted field path, empty for the whole body).
    fn check(&self, schema: &Schema, value: &Value, at: &str, partial: bool) -> Result<(), String> {
        if let Some(reference) = &schema.reference {
            return self.check(self.resolve(reference)?, value, at, partial);
        }
        let kind = match schema.kind.as_deref() {
            Some(kind) => kind,
            None if !schema.properties.is_empty() => "object",
            // No type, no properties: anything goes (the spec says nothing).
            None => return Ok(()),
        };
        let fits = match kind {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            other => {
                return Err(format!(
                    "the spec uses type {other}, which the double does not know"
                ));
            }
        };
        if !fits {
            return Err(format!(
                "invalid type for {}: expected {kind}, found {}",
                field(at),
                describe(value)
            ));
        }
        match value {
            Value::Object(map) => {
                for (key, item) in map {
                    let inner = join(at, key);
                    match (schema.properties.get(key), &schema.additional) {
                        (Some(property), _) => self.check(property, item, &inner, false)?,
                        (None, Some(Additional::Any(true))) => {}
                        (None, Some(Additional::Schema(additional))) => {
                            self.check(additional, item, &inner, false)?
                        }
                        (None, _) => {
                            let expected: Vec<String> =
                                schema.properties.keys().map(|k| format!("`{k}`")).collect();
                            return Err(format!(
                                "unknown field `{key}`{}, expected one of {}",
                                within(at),
                                expected.join(", ")
                            ));
                        }
                    }
                }
                if !partial {
                    for name in &schema.required {
                        if !map.contains_key(name) {
                            return Err(format!("missing field `{name}`{}", within(at)));
                        }
                    }
                }
            }
            Value::Array(items) => {
                if let Some(item_schema) = &schema.items {
                    for (i, item) in items.iter().enumerate() {
                        self.check(item_schema, item, &format!("{at}[{i}]"), false)?;
                    }
                }
            }
            Value::String(s) => {
                if let Some(variants) = &schema.variants {
                    // Logger.level says "The possible values are case-insensitive".
                    let loose = schema.description.contains("case-insensitive");
                    let known = variants.iter().filter_map(Value::as_str).any(|v| {
                        if loose {
                            v.eq_ignore_ascii_case(s)
                        } else {
                            v == s
                        }
                    });
                    if !known {
                        let expected: Vec<String> =
                            variants.iter().map(|v| format!("`{}`", plain(v))).collect();
                        return Err(format!(
                            "unknown variant `{s}` for {}, expected one of {}",
                            field(at),
                            expected.join(", ")
                        ));
                    }
                }
            }
            Value::Number(n) => {
                let x = n.as_f64().unwrap_or_default();
                if let Some(min) = schema.minimum
                    && x < min
                {
                    return Err(format!("{} is {n}, below the minimum {min}", field(at)));
                }
                if let Some(max) = schema.maximum
                    && x > max
                {
                    return Err(format!("{} is {n}, above the maximum {max}", field(at)));
                }
            }
            Value::Bool(_) | Value::Null => {}
        }
        Ok(())
    }
}

fn split(path: &str) -> impl Iterator<Item = &str> {
    path.trim_start_matches('/').split_terminator('/')
}

fn is_template(segment: &str) -> bool {
    segment.starts_with('{') && segment.ends_with('}')
}

/// `Some(id)` if `segments` fit `pattern`; the id is the templated segment's value.
fn matches(pattern: &[&str], segments: &[&str]) -> Option<Option<String>> {
    if pattern.len() != segments.len() {
        return None;
    }
    let mut id = None;
    for (p, s) in pattern.iter().zip(segments) {
        if is_template(p) {
            id = Some((*s).to_owned());
        } else if p != s {
            return None;
        }
    }
    Some(id)
}

fn method_name(method: &str) -> String {
    method.to_ascii_uppercase()
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

fn field(at: &str) -> String {
    if at.is_empty() {
        "the body".to_owned()
    } else {
        format!("`{at}`")
    }
}

fn within(at: &str) -> String {
    if at.is_empty() {
        String::new()
    } else {
        format!(" in `{at}`")
    }
}

fn plain(value: &Value) -> String {
    value
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| value.to_string())
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_oldest_release_parses_and_lacks_newer_fields() {
        let oldest = Spec::oldest();
        assert_eq!(oldest.version(), OLDEST_SUPPORTED);
        // `free_page_hinting` came after v1.10.0: v1.10 refuses it (deny_unknown_fields),
        // the newest accepts it.
        let balloon = json!({"amount_mib": 0, "deflate_on_oom": false, "free_page_hinting": true});
        let err = oldest
            .validate("PUT", "/balloon", Some(&balloon))
            .unwrap_err();
        assert!(err.contains("free_page_hinting"), "{err}");
        Spec::load()
            .validate("PUT", "/balloon", Some(&balloon))
            .unwrap();
        assert!(oldest.validate("PUT", "/serial", Some(&json!({}))).is_err());
        assert_eq!(Release::parse("1.10.0"), Some(Release::Oldest));
        assert_eq!(Release::parse("newest"), Some(Release::Newest));
        assert_eq!(Release::parse("0.9"), None);
    }

    #[test]
    fn spec_parses_and_knows_the_paths() {
        let spec = Spec::load();
        assert_eq!(spec.version(), "1.17.0-dev");
        let paths: Vec<&str> = spec.paths().collect();
        for path in [
            "/",
            "/actions",
            "/boot-source",
            "/drives/{drive_id}",
            "/network-interfaces/{iface_id}",
            "/pmem/{id}",
            "/machine-config",
            "/vsock",
            "/logger",
            "/metrics",
            "/mmds",
            "/mmds/config",
            "/vm",
            "/vm/config",
            "/version",
            "/snapshot/create",
            "/snapshot/load",
        ] {
            assert!(paths.contains(&path), "{path} missing from {paths:?}");
        }
        let methods: Vec<&str> = spec.methods("/drives/{drive_id}").collect();
        assert_eq!(methods, ["patch", "put"]);
        let methods: Vec<&str> = spec.methods("/machine-config").collect();
        assert_eq!(methods, ["get", "patch", "put"]);
    }

    #[test]
    fn validate_accepts_correct_bodies() {
        let spec = Spec::load();
        let ok = [
            (
                "PUT",
                "/machine-config",
                json!({"vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "track_dirty_pages": true, "huge_pages": "None"}),
            ),
            ("PATCH", "/machine-config", json!({"mem_size_mib": 2048})),
            (
                "PUT",
                "/boot-source",
                json!({"kernel_image_path": "/vmlinux", "initrd_path": "/initrd", "boot_args": "console=ttyS0"}),
            ),
            (
                "PUT",
                "/drives/rootfs",
                json!({"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": true, "is_read_only": false, "cache_type": "Writeback", "io_engine": "Sync", "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}),
            ),
            (
                "PATCH",
                "/drives/rootfs",
                json!({"drive_id": "rootfs", "path_on_host": "/other.ext4"}),
            ),
            (
                "PUT",
                "/network-interfaces/eth0",
                json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02", "mtu": 1500}),
            ),
            (
                "PUT",
                "/vsock",
                json!({"guest_cid": 3, "uds_path": "/v.sock"}),
            ),
            (
                "PUT",
                "/logger",
                json!({"log_path": "/log", "level": "Debug", "show_level": true, "show_log_origin": false}),
            ),
            ("PUT", "/logger", json!({"level": "debug"})),
            (
                "PUT",
                "/metrics",
                json!({"metrics_path": "/metrics", "properties": {"vm": "a"}}),
            ),
            ("PUT", "/actions", json!({"action_type": "InstanceStart"})),
            ("PUT", "/mmds", json!({"anything": {"goes": [1, 2]}})),
            ("PATCH", "/vm", json!({"state": "Paused"})),
        ];
        for (method, path, body) in ok {
            spec.validate(method, path, Some(&body))
                .unwrap_or_else(|e| panic!("{method} {path} {body}: {e}"));
        }
        spec.validate("GET", "/", None).unwrap();
        spec.validate("GET", "/machine-config", None).unwrap();
        spec.validate("GET", "/vm/config?x=1", None).unwrap();
    }

    #[test]
    fn validate_refuses_a_missing_required_field() {
        let spec = Spec::load();
        let err = spec
            .validate("PUT", "/boot-source", Some(&json!({"boot_args": "x"})))
            .unwrap_err();
        assert!(err.contains("`kernel_image_path`"), "{err}");
        let err = spec
            .validate("PUT", "/machine-config", Some(&json!({"vcpu_count": 2})))
            .unwrap_err();
        assert!(err.contains("`mem_size_mib`"), "{err}");
        // Nested: a token bucket without its size.
        let body = json!({"drive_id": "a", "is_root_device": false, "rate_limiter": {"ops": {"refill_time": 1}}});
        let err = spec.validate("PUT", "/drives/a", Some(&body)).unwrap_err();
        assert!(
            err.contains("`size`") && err.contains("rate_limiter.ops"),
            "{err}"
        );
        let err = spec.validate("PUT", "/actions", None).unwrap_err();
        assert!(err.contains("needs a body"), "{err}");
    }

    #[test]
    fn validate_refuses_a_wrong_type() {
        let spec = Spec::load();
        let err = spec
            .validate(
                "PUT",
                "/machine-config",
                Some(&json!({"vcpu_count": "2", "mem_size_mib": 128})),
            )
            .unwrap_err();
        assert!(
            err.contains("`vcpu_count`") && err.contains("integer"),
            "{err}"
        );
        let err = spec
            .validate(
                "PUT",
                "/machine-config",
                Some(&json!({"vcpu_count": 1.5, "mem_size_mib": 128})),
            )
            .unwrap_err();
        assert!(err.contains("`vcpu_count`"), "{err}");
        let body = json!({"drive_id": "a", "is_root_device": "yes"});
        let err = spec.validate("PUT", "/drives/a", Some(&body)).unwrap_err();
        assert!(
            err.contains("`is_root_device`") && err.contains("boolean"),
            "{err}"
        );
        let body = json!({"network_interfaces": "eth0"});
        let err = spec
            .validate("PUT", "/mmds/config", Some(&body))
            .unwrap_err();
        assert!(
            err.contains("`network_interfaces`") && err.contains("array"),
            "{err}"
        );
        let body = json!({"network_interfaces": [1]});
        let err = spec
            .validate("PUT", "/mmds/config", Some(&body))
            .unwrap_err();
        assert!(err.contains("`network_interfaces[0]`"), "{err}");
        let body = json!({"kernel_image_path": "/k", "initrd_path": null});
        let err = spec
            .validate("PUT", "/boot-source", Some(&body))
            .unwrap_err();
        assert!(
            err.contains("`initrd_path`") && err.contains("null"),
            "{err}"
        );
        let err = spec
            .validate("PUT", "/boot-source", Some(&json!([])))
            .unwrap_err();
        assert!(err.contains("the body"), "{err}");
    }

    #[test]
    fn validate_refuses_an_unknown_property() {
        let spec = Spec::load();
        let body = json!({"vcpu_count": 1, "mem_size_mib": 128, "cpus": 4});
        let err = spec
            .validate("PUT", "/machine-config", Some(&body))
            .unwrap_err();
        assert!(err.contains("unknown field `cpus`"), "{err}");
        // Nested, as in Firecracker's own test: `bytes` is not a RateLimiter field.
        let body = json!({"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {"bytes": {"size": 1, "refill_time": 1}}});
        let err = spec
            .validate("PUT", "/network-interfaces/eth0", Some(&body))
            .unwrap_err();
        assert!(
            err.contains("`bytes`") && err.contains("rx_rate_limiter"),
            "{err}"
        );
        // Metrics.properties only takes strings.
        let body = json!({"metrics_path": "/m", "properties": {"n": 1}});
        let err = spec.validate("PUT", "/metrics", Some(&body)).unwrap_err();
        assert!(err.contains("`properties.n`"), "{err}");
    }

    #[test]
    fn validate_refuses_a_bad_enum_value() {
        let spec = Spec::load();
        let err = spec
            .validate("PUT", "/actions", Some(&json!({"action_type": "Reboot"})))
            .unwrap_err();
        assert!(
            err.contains("`Reboot`") && err.contains("`action_type`"),
            "{err}"
        );
        assert!(err.contains("`InstanceStart`"), "{err}");
        let body = json!({"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "1G"});
        let err = spec
            .validate("PUT", "/machine-config", Some(&body))
            .unwrap_err();
        assert!(err.contains("`huge_pages`"), "{err}");
        // Case matters except where the spec says it does not.
        let err = spec
            .validate("PATCH", "/vm", Some(&json!({"state": "paused"})))
            .unwrap_err();
        assert!(err.contains("`state`"), "{err}");
    }

    #[test]
    fn validate_checks_integer_bounds() {
        let spec = Spec::load();
        let err = spec
            .validate(
                "PUT",
                "/vsock",
                Some(&json!({"guest_cid": 2, "uds_path": "/v"})),
            )
            .unwrap_err();
        assert!(
            err.contains("`guest_cid`") && err.contains("minimum"),
            "{err}"
        );
        let body = json!({"vcpu_count": 0, "mem_size_mib": 128});
        let err = spec
            .validate("PUT", "/machine-config", Some(&body))
            .unwrap_err();
        assert!(err.contains("`vcpu_count`"), "{err}");
        let body = json!({"vcpu_count": 33, "mem_size_mib": 128});
        let err = spec
            .validate("PUT", "/machine-config", Some(&body))
            .unwrap_err();
        assert!(err.contains("maximum"), "{err}");
    }

    #[test]
    fn validate_refuses_an_unknown_path_or_method() {
        let spec = Spec::load();
        let err = spec.validate("GET", "/nope", None).unwrap_err();
        assert!(err.contains("/nope"), "{err}");
        let body = json!({"kernel_image_path": "/k"});
        let err = spec
            .validate("POST", "/boot-source", Some(&body))
            .unwrap_err();
        assert!(err.contains("POST"), "{err}");
        assert!(spec.validate("GET", "/boot-source", None).is_err());
        assert!(spec.validate("DELETE", "/drives/a", None).is_err());
        assert!(
            spec.validate("PUT", "/drives/a/b", Some(&json!({})))
                .is_err()
        );
        assert_eq!(
            spec.route("PUT", "/drives").unwrap_err(),
            RouteError::MissingId
        );
        let err = spec.validate("GET", "/", Some(&json!({}))).unwrap_err();
        assert!(err.contains("takes no body"), "{err}");
    }

    #[test]
    fn responses_are_checked_against_their_schema() {
        let spec = Spec::load();
        let info = json!({"app_name": "Firecracker", "id": "anonymous-instance", "state": "Running", "vmm_version": "1.17.0-dev"});
        spec.check_response("GET", "/", 200, &info).unwrap();
        let bad =
            json!({"app_name": "Firecracker", "id": "x", "state": "Exited", "vmm_version": "1"});
        assert!(spec.check_response("GET", "/", 200, &bad).is_err());
    }
}
