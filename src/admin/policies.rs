//! The policies (Terms, Privacy, Refund, Acceptable Use) as the conf gives them (`[brand]`,
//! Markdown files; the shipped texts are the seeds'), rendered to HTML with the brand's names
//! filled in. Raw HTML in a policy file is shown as text, never passed through.

use crate::conf::{BrandConf, PolicyDoc};
use maud::{Markup, PreEscaped};
use pulldown_cmark::{Event, Parser, html};

/// The text with `{product_name}`, `{legal_entity}` and `{support_email}` filled in.
pub fn fill(text: &str, brand: &BrandConf, support: &str) -> String {
    text.replace("{product_name}", &brand.product_name)
        .replace("{legal_entity}", &brand.legal_entity)
        .replace("{support_email}", support)
}

/// A policy's body as HTML.
pub fn render(doc: &PolicyDoc, brand: &BrandConf, support: &str) -> Markup {
    let text = fill(&doc.body, brand, support);
    let events = Parser::new(&text).map(|e| match e {
        Event::Html(t) | Event::InlineHtml(t) => Event::Text(t),
        other => other,
    });
    let mut out = String::new();
    html::push_html(&mut out, events);
    PreEscaped(out)
}

pub fn by_slug<'a>(brand: &'a BrandConf, slug: &str) -> Option<&'a PolicyDoc> {
    brand.policies.iter().find(|p| p.slug == slug)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_markdown_and_escapes_raw_html() {
        let brand = BrandConf {
            product_name: "Acme AI".into(),
            legal_entity: "Acme Ltd".into(),
            policies: Vec::new(),
        };
        let doc = PolicyDoc::parse(
            "terms",
            "# Terms\n\n{product_name} by {legal_entity}.\n\n- one\n- **two**\n\n<script>alert(1)</script>\n",
            "2026-12-01",
        )
        .expect("doc");
        assert_eq!(doc.title, "Terms");
        let html = render(&doc, &brand, "help@acme.test").into_string();
        assert!(html.contains("<p>Acme AI by Acme Ltd.</p>"), "{html}");
        assert!(html.contains("<li><strong>two</strong></li>"), "{html}");
        assert!(
            html.contains("&lt;script&gt;") && !html.contains("<script>"),
            "{html}"
        );
        assert!(PolicyDoc::parse("terms", "no title\n", "2026-12-01").is_none());
    }
}
