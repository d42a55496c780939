//! Config: parse (serde, unknown fields refused) → validate (cross references) → freeze.
//!
//! One function, [`load`], serves startup, `tollgate check` and (later) reload.

mod asynchronous;
mod cluster;
mod deployed;
mod fleet;
mod guard;
mod keys;
mod limits;
mod raw;
mod snapshot;
mod tokenizer;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use asynchronous::{secrets_of, AsyncSettings};
pub use cluster::{ClusterSettings, OnRedisDown};
pub use deployed::{
    is_model_id, DeployedModel, Deployment, Wake, WakeAction, DEFAULT_PREDICT_PATH,
};
pub use fleet::{Ejection, HealthCheck, Policy, QueueSettings};
pub use guard::dropped_protections;
pub use keys::key_id;
pub use raw::{DEFAULT_ADMIN_LISTEN, DEFAULT_LISTEN, DEFAULT_MAX_BODY_BYTES, DEFAULT_STATE_DIR};
pub use snapshot::*;
pub use tokenizer::{PromptRules, Tokenizer};
pub use validate::{FEATURES, MODALITIES};

/// Why a config was refused: where (file, line, TOML path) and what to change.
#[derive(Debug)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    /// The TOML path, e.g. `pools[0].replicas[2]`; empty for syntax errors.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}:", file.display())?;
        }
        if let Some(line) = self.line {
            write!(f, "{line}:")?;
        }
        if self.file.is_some() || self.line.is_some() {
            f.write_str(" ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Snapshot, ConfigError> {
    from_file(path, parse)
}

/// `take` applied to the text of the file at `path`; its errors name the file.
fn from_file<T>(
    path: &Path,
    take: impl FnOnce(&str) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    let in_file = |mut e: ConfigError| {
        e.file = Some(path.to_path_buf());
        e
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        in_file(ConfigError {
            file: None,
            line: None,
            path: String::new(),
            message: format!("cannot read the config file: {e}"),
        })
    })?;
    take(&text).map_err(in_file)
}

/// Parses and validates config text. A config that would let no request through (no
/// model or no key) is refused: it is most likely a file emptied or cut short.
pub fn parse(text: &str) -> Result<Snapshot, ConfigError> {
    let snapshot = validate::validate(parse_raw(text)?, &validate::Source { text })?;
    guard::serves_something(&snapshot)?;
    Ok(snapshot)
}

/// Only the `[state]` section of a config file, validated: where the ledger is. For
/// commands that read the ledger and nothing else (`tollgate usage`), so that they need
/// neither the replicas' secrets in the environment nor their names in DNS.
pub fn load_state(path: &Path) -> Result<StateSettings, ConfigError> {
    from_file(path, |text| {
        validate::state(&parse_raw(text)?.state, &validate::Source { text })
    })
}

/// The file as TOML in the config's shape; an error names the TOML path where it is.
fn parse_raw(text: &str) -> Result<raw::RawConfig, ConfigError> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        // Values kept with their position (`Spanned`) add a private segment of their own.
        let path = e
            .path()
            .to_string()
            .replace(".$__serde_spanned_private_value", "");
        let inner = e.into_inner();
        ConfigError {
            file: None,
            line: inner.span().map(|s| validate::line_of(text, s.start)),
            // `.` is the root: an error in no table in particular.
            path: if path == "." { String::new() } else { path },
            message: inner.message().trim_end().to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn ok(extra: &str) -> String {
        format!(
            r#"
[[pools]]
name = "llama"
replicas = ["127.0.0.1:8000", "127.0.0.1:8001"]

[[models]]
slug = "meta/llama"
pool = "llama"

[[keys]]
id = "team-a"
sha256 = "{DIGEST}"
models = ["*"]
{extra}"#
        )
    }

    fn err(text: &str) -> String {
        parse(text)
            .expect_err("config should be refused")
            .to_string()
    }

    #[test]
    fn a_minimal_file_gets_the_documented_defaults() {
        let s = parse(&ok("")).unwrap();
        assert_eq!(s.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(s.admin.listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert_eq!(s.server.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        let m = s.model("meta/llama").unwrap();
        assert_eq!(m.upstream_model, "meta/llama");
        assert_eq!(m.input_modalities, vec!["text"]);
        assert_eq!(m.media_urls, MediaUrls::PublicOnly);
        let p = &m.prompt;
        assert_eq!((p.per_message, p.per_request), (8, 64));
        assert_eq!(p.max_image_tokens, 4096);
        assert!(p.tokenizer.is_none());
        let digest: [u8; 32] = hex::decode(DIGEST).unwrap().try_into().unwrap();
        assert_eq!(&*s.key_by_digest(&digest).unwrap().id, "team-a");
    }

    #[test]
    fn unknown_field_is_refused_with_its_line() {
        let e = err(&ok("[server]\nlisten_port = 80\n"));
        assert!(e.contains("unknown field `listen_port`"), "{e}");
        assert!(e.starts_with("15: server.listen_port:"), "{e}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_path() {
        let e = err(&ok("rpm = \"120\"\n"));
        assert!(
            e.starts_with("14: keys[0].rpm: invalid type: string \"120\""),
            "{e}"
        );
        let e = err(&ok("").replace("\"127.0.0.1:8001\"", "8001"));
        assert!(e.contains("pools[0].replicas[1]: invalid type"), "{e}");
    }

    #[test]
    fn the_state_section_loads_without_what_the_rest_needs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        // The replicas' key is not in this environment: `load` refuses, `load_state` does not.
        let text = ok("[state]\ndir = \"/srv/tg\"\n").replace(
            "replicas = [",
            "upstream_api_key_env = \"TOLLGATE_TEST_NEVER_SET\"\nreplicas = [",
        );
        std::fs::write(&path, text).unwrap();
        assert!(load(&path).is_err());
        assert_eq!(load_state(&path).unwrap().dir, Path::new("/srv/tg"));
        std::fs::write(&path, "[state]\ndir = \"\"\n").unwrap();
        let e = load_state(&path).unwrap_err().to_string();
        assert!(e.contains("state.dir: must not be empty"), "{e}");
    }

    #[test]
    fn settings_that_could_never_work_are_refused() {
        let model = |lines: &str| {
            ok("").replace(
                "pool = \"llama\"\n",
                &format!("pool = \"llama\"\n{lines}\n"),
            )
        };
        let cases = [
            (
                ok("[server]\nlisten = \"0.0.0.0:9090\"\n[admin]\nlisten = \"127.0.0.1:9090\"\n"),
                "admin.listen: 127.0.0.1:9090 is also where server.listen",
            ),
            (
                ok("").replace("127.0.0.1:8001", "127.0.0.1:0"),
                "pools[0].replicas[1]: \"127.0.0.1:0\" has port 0",
            ),
            (
                ok("budget = { usd = 1e-12, period = \"daily\" }\n"),
                "keys[0].budget.usd: 0.000000000001 USD is less than a nano-dollar",
            ),
            (
                ok("budget = { usd = 1.0, period = \"daily\", alert_at = [0.5, 20.0] }\n"),
                "must be > 0 and at most 10",
            ),
            (
                ok("[alerts]\nwebhook_url = \"https://\"\n"),
                "alerts.webhook_url: \"https://\" is not an http:// or https:// URL with a host",
            ),
            (
                model("upstream_model = \"\""),
                "models[0].upstream_model: must name the model the replica serves",
            ),
            (
                model("context_tokens = 8192\nmax_output_tokens = 16384"),
                "models[0].max_output_tokens: 16384 is more than context_tokens (8192)",
            ),
            (
                model("max_image_tokens = 0"),
                "models[0].max_image_tokens: must be at least 1 (tokens)",
            ),
            (
                model("tokenizer = \"/nonexistent/tokenizer.json\""),
                "models[0].tokenizer: cannot read \"/nonexistent/tokenizer.json\"",
            ),
            (
                model("template_overhead = { per_turn = 3 }"),
                "unknown field `per_turn`",
            ),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "{e}\nwanted: {want}");
        }
        // Port 0 for both listeners picks two free ports: no clash.
        parse(&ok(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        ))
        .unwrap();
        assert!(key_id("team a").is_err() && key_id("team-a").is_ok());
    }

    #[test]
    fn model_pointing_at_a_missing_pool_names_the_path() {
        let text = ok("").replace("pool = \"llama\"", "pool = \"lama\"");
        let e = err(&text);
        assert!(
            e.contains("models[0].pool: \"lama\" is not a defined pool (defined: \"llama\")"),
            "{e}"
        );
        assert!(e.starts_with("8:"), "{e}");
    }

    #[test]
    fn malformed_replica_address_is_refused() {
        let text = ok("").replace("127.0.0.1:8001", "10.0.0.7");
        let e = err(&text);
        assert!(
            e.contains("pools[0].replicas[1]: \"10.0.0.7\" is not host:port"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_key_id_is_refused() {
        let extra = "[[keys]]\nid = \"team-a\"\nsha256 = \"00000000000000000000000000000000000000000000000000000000000000ff\"\nmodels = [\"*\"]\n";
        let e = err(&ok(extra));
        assert!(
            e.contains("keys[1].id: key id \"team-a\" is used twice"),
            "{e}"
        );
    }

    #[test]
    fn bad_digest_and_unknown_model_pattern_are_refused() {
        let e = err(&ok("").replace(DIGEST, "abc"));
        assert!(
            e.contains("keys[0].sha256: must be the 64 hex digits"),
            "{e}"
        );
        let e = err(&ok("").replace("models = [\"*\"]", "models = [\"meta/lama\"]"));
        assert!(
            e.contains("keys[0].models[0]: \"meta/lama\" matches no model"),
            "{e}"
        );
    }

    #[test]
    fn missing_upstream_key_env_is_refused_without_leaking_anything() {
        let text = ok("").replace(
            "replicas = [",
            "upstream_api_key_env = \"TOLLGATE_TEST_SURELY_UNSET\"\nreplicas = [",
        );
        let e = err(&text);
        assert!(e.contains("pools[0].upstream_api_key_env: environment variable TOLLGATE_TEST_SURELY_UNSET is not set"), "{e}");
    }

    #[test]
    fn an_upstream_key_that_cannot_be_a_header_is_refused_without_leaking_it() {
        // Only this test sets this variable.
        std::env::set_var("TOLLGATE_TEST_BAD_UPSTREAM_KEY", "sk-secret\r\nx-evil: 1");
        let text = ok("").replace(
            "replicas = [",
            "upstream_api_key_env = \"TOLLGATE_TEST_BAD_UPSTREAM_KEY\"\nreplicas = [",
        );
        let e = err(&text);
        assert!(e.contains("pools[0].upstream_api_key_env: environment variable TOLLGATE_TEST_BAD_UPSTREAM_KEY holds characters"), "{e}");
        assert!(!e.contains("sk-secret"), "{e}");
    }

    #[test]
    fn prices_finer_than_a_nano_dollar_per_token_and_caps_past_the_maximum_are_refused() {
        let priced =
            |p: &str| ok("").replace("pool = \"llama\"", &format!("pool = \"llama\"\n{p}"));
        let e = err(&priced(
            "price = { input_per_mtok = 0.0375, output_per_mtok = 1 }",
        ));
        assert!(
            e.contains("models[0].price: 0.0375 has more than 3 decimals"),
            "{e}"
        );
        assert!(e.contains("e.g. to 0.038"), "{e}");
        let s = parse(&priced("price = { input_per_mtok = 0.1, cached_input_per_mtok = 0.014, output_per_mtok = 2.19 }")).unwrap();
        let p = s.model("meta/llama").unwrap().token_prices;
        assert_eq!((p.input, p.cached_input, p.output), (100, 14, 2190));
        let e = err(&priced("max_output_tokens = 100\ndefault_max_tokens = 200"));
        assert!(
            e.contains("models[0].default_max_tokens: 200 is more than max_output_tokens (100)"),
            "{e}"
        );
    }

    #[test]
    fn unknown_feature_and_zero_values_are_refused() {
        let e = err(&ok("").replace(
            "pool = \"llama\"",
            "pool = \"llama\"\nfeatures = [\"telepathy\"]",
        ));
        assert!(
            e.contains("models[0].features[0]: \"telepathy\" is not one of"),
            "{e}"
        );
        let e = err(&ok("").replace(
            "pool = \"llama\"",
            "pool = \"llama\"\nmedia_urls = \"private\"",
        ));
        assert!(
            e.contains("models[0].media_urls: \"private\" is not one of: public_only, any, none"),
            "{e}"
        );
        let e = err(&ok("[server]\nmax_body_bytes = 0\n"));
        assert!(
            e.contains("server.max_body_bytes: must be greater than 0"),
            "{e}"
        );
    }
}
