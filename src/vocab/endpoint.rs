//! Which surface a request hit, and which error dialect its client reads.

/// Which surface a request hit; also the `endpoint` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Messages,
    CountTokens,
    Models,
    Model,
    /// A deployed model's route: predict, sync pass-through, wake.
    Predict,
    Unknown,
}

/// The error shape a client understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `{"error": {"message", "type", "param", "code"}}`
    OpenAi,
    /// `{"type": "error", "error": {"type", "message"}}`
    Anthropic,
    /// `{"error": "message"}`: deployed models' predict routes.
    Predict,
}

impl Endpoint {
    /// The surface a method and path name.
    pub fn of(method: &str, path: &str) -> Endpoint {
        match (method, path) {
            ("POST", "/v1/chat/completions") => Endpoint::ChatCompletions,
            ("POST", "/v1/messages") => Endpoint::Messages,
            ("POST", "/v1/messages/count_tokens") => Endpoint::CountTokens,
            ("GET", "/v1/models") => Endpoint::Models,
            ("GET", p) if p.starts_with("/v1/models/") => Endpoint::Model,
            _ => Endpoint::Unknown,
        }
    }

    /// The method a known path takes, for a `405` with `Allow` when another was used.
    pub fn allowed_method(path: &str) -> Option<&'static str> {
        match path {
            "/v1/chat/completions" | "/v1/messages" | "/v1/messages/count_tokens" => Some("POST"),
            "/v1/models" => Some("GET"),
            p if p.starts_with("/v1/models/") => Some("GET"),
            _ => None,
        }
    }

    /// The error dialect of the surface. Outside the two known surfaces (a wrong method or
    /// path, the catalog), a request under `/v1/messages` or one sent with
    /// `anthropic-version` (as the Anthropic SDK does) gets Anthropic's.
    pub fn dialect(self, req: &http::request::Parts) -> Dialect {
        match self {
            Endpoint::Messages | Endpoint::CountTokens => Dialect::Anthropic,
            Endpoint::ChatCompletions => Dialect::OpenAi,
            Endpoint::Predict => Dialect::Predict,
            Endpoint::Models | Endpoint::Model | Endpoint::Unknown => {
                let anthropic = req.uri.path().starts_with("/v1/messages")
                    || req.headers.contains_key("anthropic-version");
                match anthropic {
                    true => Dialect::Anthropic,
                    false => Dialect::OpenAi,
                }
            }
        }
    }

    /// Whether requests to it use a model and are billed.
    pub fn is_billable(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions | Endpoint::Messages | Endpoint::Predict
        )
    }

    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "count_tokens",
            Endpoint::Models => "models",
            Endpoint::Model => "model",
            Endpoint::Predict => "predict",
            Endpoint::Unknown => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_and_paths_name_surfaces() {
        assert_eq!(
            Endpoint::of("POST", "/v1/chat/completions"),
            Endpoint::ChatCompletions
        );
        assert_eq!(Endpoint::of("GET", "/v1/models/a/b"), Endpoint::Model);
        assert_eq!(Endpoint::of("GET", "/v1/messages"), Endpoint::Unknown);
        assert_eq!(Endpoint::allowed_method("/v1/messages"), Some("POST"));
        assert_eq!(Endpoint::allowed_method("/v1/models/x"), Some("GET"));
        assert_eq!(Endpoint::allowed_method("/v2"), None);
    }
}
