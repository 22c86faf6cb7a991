//! The product's policies, word for word as the seeds publish them (`../shared/seeds/`). The
//! support address is the conf's (`admin.support_email`), substituted where the text names it.

pub struct Policy {
    pub slug: &'static str,
    pub title: &'static str,
    pub paragraphs: &'static [&'static str],
}

/// Where the seeds wrote the support address.
pub const SEED_SUPPORT_EMAIL: &str = "support@duang-duang.com";

pub const POLICIES: &[Policy] = &[
    Policy {
        slug: "terms",
        title: "Terms of Service",
        paragraphs: &[
            "Duang Duang provides prepaid API credits and a software gateway for accessing supported AI model providers through a unified API. Customers are responsible for keeping API keys secure and for all usage made through their keys.",
            "Credits are prepaid and deducted based on model usage, including input tokens, output tokens, and applicable pricing rules. Customers must follow applicable upstream provider policies and legal requirements. Duang Duang does not grant permission to bypass provider restrictions, rate limits, or safety policies.",
        ],
    },
    Policy {
        slug: "privacy",
        title: "Privacy Policy",
        paragraphs: &[
            "We collect account information, API key metadata, payment records, usage records, and technical logs needed to operate the service. We record token usage, selected models, request status, provider cost, billed amount, and timestamps.",
            "Payment processing is handled by Stripe. We do not store full card numbers on our servers. We may share necessary request data with upstream AI model providers to fulfill API requests.",
        ],
    },
    Policy {
        slug: "refunds",
        title: "Refund Policy",
        paragraphs: &[
            "Prepaid credits are generally refundable only for unused balances, billing errors, duplicate charges, or service issues reviewed by support. Credits consumed by API usage are not refundable unless the usage was caused by a confirmed platform error.",
            "Refund requests should include the account email, payment date, amount, and reason. Contact support@duang-duang.com.",
        ],
    },
    Policy {
        slug: "acceptable-use",
        title: "Acceptable Use Policy",
        paragraphs: &[
            "Customers must use Duang Duang lawfully and in compliance with upstream AI provider policies. Prohibited uses include illegal activity, fraud, credential theft, phishing, malware, harassment, attempts to bypass provider restrictions, and automated activity that harms service stability or violates rate limits.",
            "We may throttle, suspend, or terminate accounts and API keys that violate this policy. Report abuse to support@duang-duang.com.",
        ],
    },
];

pub fn by_slug(slug: &str) -> Option<&'static Policy> {
    POLICIES.iter().find(|p| p.slug == slug)
}
