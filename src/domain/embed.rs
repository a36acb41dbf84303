//! The `embed_code` snippet for an activation.
//!
//! Every value is escaped for an HTML attribute (`&`, `<`, `>`, `"`, `'`),
//! so no configuration value can close the attribute or the tag: the
//! browser hands the widget back exactly the JSON that was stored.

use uuid::Uuid;

pub fn embed_code(
    script_url: &str,
    customer: Uuid,
    app_slug: &str,
    configuration: &serde_json::Value,
) -> String {
    format!(
        "<script src=\"{}\" data-app-id=\"{}\" data-customer-id=\"{}\" data-config=\"{}\" async></script>",
        escape_attribute(script_url),
        escape_attribute(app_slug),
        customer,
        escape_attribute(&configuration.to_string()),
    )
}

/// `value` safe inside a double- or single-quoted HTML attribute.
pub(crate) fn escape_attribute(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 16);
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_cannot_break_out_of_the_attribute_or_the_tag() {
        let config = serde_json::json!({"button_text": "\"'><script>alert(1)</script>"});
        let code = embed_code(
            "https://cdn.varai.com/apps/vto/embed.js",
            Uuid::nil(),
            "vto-001",
            &config,
        );
        assert_eq!(code.matches('"').count(), 8, "{code}");
        assert_eq!(code.matches("<script").count(), 1);
        assert_eq!(code.matches("</script>").count(), 1);
        assert!(!code.contains('\''));
    }
}
