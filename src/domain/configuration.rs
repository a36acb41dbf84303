//! An activation's `configuration`, checked against its app's
//! `configuration_schema`.
//!
//! The schema format is the specification's: an object whose fields each
//! name a `type` — `select` (with `options`), `string`, `integer`,
//! `number`, `boolean`, or `object` (with `properties`, the same format
//! again) — and an optional `default`. Validation fills in defaults,
//! refuses fields the schema does not name, and reports every problem at
//! once, one detail per field, with its dotted path
//! (`configuration.style_customization.button_color`).

use serde_json::{Map, Value};

use crate::error::FieldError;

/// Longest string accepted in a configuration value: values end up in the
/// merchant's page, and nothing an embed needs is longer.
const MAX_STRING_CHARS: usize = 1000;

/// The field types a schema may name.
const FIELD_TYPES: [&str; 6] = ["select", "string", "integer", "number", "boolean", "object"];

/// Checks `configuration` against `schema`; returns it with the defaults
/// filled in, or one error per invalid field.
pub fn validate(
    schema: &Value,
    configuration: &Map<String, Value>,
) -> Result<Value, Vec<FieldError>> {
    let mut problems = Vec::new();
    let filled = check_object(schema, configuration, "configuration", &mut problems);
    if problems.is_empty() {
        Ok(Value::Object(filled))
    } else {
        Err(problems)
    }
}

/// Checks that `schema` is a `configuration_schema` in the format
/// [`validate`] reads, adding one problem per malformed field.
pub fn check_schema(schema: &serde_json::Value, path: &str, problems: &mut Vec<FieldError>) {
    let Some(fields) = schema.as_object() else {
        problems.push(FieldError::new(path, "must be an object of settings"));
        return;
    };
    for (name, field) in fields {
        let field_path = format!("{path}.{name}");
        let kind = field.get("type").and_then(|t| t.as_str());
        match kind {
            Some(k) if FIELD_TYPES.contains(&k) => {}
            _ => {
                problems.push(FieldError::new(
                    format!("{field_path}.type"),
                    format!("must be one of: {}", FIELD_TYPES.join(", ")),
                ));
                continue;
            }
        }
        if kind == Some("select")
            && !field
                .get("options")
                .and_then(|o| o.as_array())
                .is_some_and(|o| !o.is_empty() && o.iter().all(|v| v.is_string()))
        {
            problems.push(FieldError::new(
                format!("{field_path}.options"),
                "must be a non-empty list of strings",
            ));
        }
        if kind == Some("object") {
            let properties = field.get("properties").cloned().unwrap_or_default();
            check_schema(&properties, &format!("{field_path}.properties"), problems);
        }
    }
}

fn check_object(
    schema: &Value,
    given: &Map<String, Value>,
    path: &str,
    problems: &mut Vec<FieldError>,
) -> Map<String, Value> {
    let fields = schema.as_object().cloned().unwrap_or_default();
    let mut out = Map::new();
    for name in given.keys() {
        if !fields.contains_key(name) {
            problems.push(FieldError::new(
                format!("{path}.{name}"),
                "is not a setting of this app",
            ));
        }
    }
    for (name, field) in &fields {
        let field_path = format!("{path}.{name}");
        match given.get(name) {
            Some(value) => {
                if let Some(value) = check_value(field, value, &field_path, problems) {
                    out.insert(name.clone(), value);
                }
            }
            None => {
                if let Some(default) = default_of(field) {
                    out.insert(name.clone(), default);
                }
            }
        }
    }
    out
}

/// A field's default: its `default`, or for an object, the defaults of
/// its properties (when it has any).
fn default_of(field: &Value) -> Option<Value> {
    if let Some(default) = field.get("default") {
        return Some(default.clone());
    }
    if field.get("type").and_then(Value::as_str) == Some("object") {
        let properties = field.get("properties")?.as_object()?;
        let defaults: Map<String, Value> = properties
            .iter()
            .filter_map(|(name, p)| Some((name.clone(), default_of(p)?)))
            .collect();
        return (!defaults.is_empty()).then_some(Value::Object(defaults));
    }
    None
}

fn check_value(
    field: &Value,
    value: &Value,
    path: &str,
    problems: &mut Vec<FieldError>,
) -> Option<Value> {
    let kind = field
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("string");
    let wrong = |problems: &mut Vec<FieldError>, message: String| {
        problems.push(FieldError::new(path, message));
        None
    };
    match kind {
        "select" => {
            let options: Vec<&str> = field
                .get("options")
                .and_then(Value::as_array)
                .map(|o| o.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match value.as_str() {
                Some(v) if options.contains(&v) => Some(value.clone()),
                _ => wrong(problems, format!("must be one of: {}", options.join(", "))),
            }
        }
        "string" => match value.as_str() {
            Some(v) if v.chars().count() <= MAX_STRING_CHARS => Some(value.clone()),
            Some(_) => wrong(
                problems,
                format!("must be at most {MAX_STRING_CHARS} characters"),
            ),
            None => wrong(problems, "must be a string".into()),
        },
        "integer" => match value.as_i64() {
            Some(_) => Some(value.clone()),
            None => wrong(problems, "must be an integer".into()),
        },
        "number" => match value.as_f64() {
            Some(_) => Some(value.clone()),
            None => wrong(problems, "must be a number".into()),
        },
        "boolean" => match value.as_bool() {
            Some(_) => Some(value.clone()),
            None => wrong(problems, "must be true or false".into()),
        },
        "object" => match value.as_object() {
            Some(given) => {
                let properties = field.get("properties").cloned().unwrap_or(Value::Null);
                Some(Value::Object(check_object(
                    &properties,
                    given,
                    path,
                    problems,
                )))
            }
            None => wrong(problems, "must be an object".into()),
        },
        other => wrong(
            problems,
            format!("has a type this service does not know ({other})"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The virtual try-on's schema, as the specification gives it.
    fn try_on() -> Value {
        json!({
            "widget_placement": {"type": "select", "options": ["product_page", "collection_page", "cart_page"], "default": "product_page"},
            "style_customization": {"type": "object", "properties": {
                "button_color": {"type": "string", "default": "#007bff"},
                "button_text": {"type": "string", "default": "Try On"}
            }},
            "max_frames": {"type": "integer", "default": 3},
            "show_badge": {"type": "boolean"},
            "zoom": {"type": "number"}
        })
    }

    fn check(configuration: Value) -> Result<Value, Vec<(String, String)>> {
        validate(&try_on(), configuration.as_object().unwrap())
            .map_err(|problems| problems.into_iter().map(|p| (p.field, p.message)).collect())
    }

    #[test]
    fn an_empty_configuration_takes_every_default_nested_ones_too() {
        assert_eq!(
            check(json!({})).unwrap(),
            json!({"widget_placement": "product_page", "max_frames": 3,
                   "style_customization": {"button_color": "#007bff", "button_text": "Try On"}})
        );
    }

    #[test]
    fn given_values_are_kept_and_missing_nested_ones_defaulted() {
        assert_eq!(
            check(json!({"widget_placement": "cart_page", "style_customization": {"button_text": "Try It On"},
                         "show_badge": false, "zoom": 1.5}))
            .unwrap(),
            json!({"widget_placement": "cart_page", "max_frames": 3, "show_badge": false, "zoom": 1.5,
                   "style_customization": {"button_color": "#007bff", "button_text": "Try It On"}})
        );
    }

    #[test]
    fn each_invalid_field_is_one_detail_with_its_path() {
        let table = [
            (
                json!({"widget_placement": "footer"}),
                "configuration.widget_placement",
                "must be one of",
            ),
            (
                json!({"widget_placement": 3}),
                "configuration.widget_placement",
                "must be one of",
            ),
            (
                json!({"max_frames": "3"}),
                "configuration.max_frames",
                "integer",
            ),
            (
                json!({"max_frames": 2.5}),
                "configuration.max_frames",
                "integer",
            ),
            (
                json!({"show_badge": "yes"}),
                "configuration.show_badge",
                "true or false",
            ),
            (json!({"zoom": "big"}), "configuration.zoom", "number"),
            (
                json!({"style_customization": "red"}),
                "configuration.style_customization",
                "object",
            ),
            (
                json!({"style_customization": {"button_color": 7}}),
                "configuration.style_customization.button_color",
                "string",
            ),
            (
                json!({"style_customization": {"font": "Arial"}}),
                "configuration.style_customization.font",
                "not a setting",
            ),
            (
                json!({"colour": "red"}),
                "configuration.colour",
                "not a setting",
            ),
            (
                json!({"style_customization": {"button_text": "x".repeat(1001)}}),
                "configuration.style_customization.button_text",
                "at most",
            ),
        ];
        for (configuration, field, message) in table {
            let problems = check(configuration.clone()).unwrap_err();
            assert_eq!(problems.len(), 1, "{configuration}: {problems:?}");
            assert_eq!(problems[0].0, field, "{configuration}");
            assert!(
                problems[0].1.contains(message),
                "{configuration}: {}",
                problems[0].1
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let problems =
            check(json!({"widget_placement": "footer", "max_frames": "many", "extra": 1}))
                .unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "configuration.extra",
                "configuration.max_frames",
                "configuration.widget_placement"
            ]
        );
    }
}
