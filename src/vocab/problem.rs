//! An error as a client reads it, in whichever dialect: decided once (in `error.rs`), then
//! rendered as a JSON body or a stream's last event by `translate::errors`.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: u16,
    /// OpenAI's `error.type`.
    pub kind: &'static str,
    /// A stable, low-cardinality code: OpenAI's `error.code` and the metric label.
    pub code: &'static str,
    /// OpenAI's `error.param`: the request field at fault.
    pub param: Option<String>,
    /// What went wrong and how to fix it. Never contains a secret.
    pub message: String,
}
