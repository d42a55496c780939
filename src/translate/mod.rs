//! Wire formats: parsing and rewriting client requests. Pure: no I/O, clock or metrics.

pub mod openai;

/// Why a request body was refused: always 400, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub message: String,
    /// The offending field, as OpenAI's `param`.
    pub param: Option<String>,
    pub code: &'static str,
}

impl RequestError {
    pub fn invalid_json(detail: impl std::fmt::Display) -> Self {
        RequestError {
            message: format!("The request body is not valid JSON ({detail}). Send a JSON object."),
            param: None,
            code: "invalid_json",
        }
    }

    pub fn missing(field: &str, hint: &str) -> Self {
        RequestError {
            message: format!("Missing required parameter: '{field}'. {hint}"),
            param: Some(field.to_string()),
            code: "missing_required_parameter",
        }
    }

    pub fn wrong_type(field: &str, expected: &str) -> Self {
        RequestError {
            message: format!("Invalid type for '{field}': expected {expected}."),
            param: Some(field.to_string()),
            code: "invalid_type",
        }
    }
}
