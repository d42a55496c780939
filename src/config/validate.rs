//! Raw TOML → `Snapshot`: cross references, units and ranges, each error naming its TOML path.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::fleet::{fleet, RawFleet};
use super::limits::{alert_settings, limits};
use super::raw::{RawConfig, RawModel, RawPool, RawState, RawTimeouts};
use super::snapshot::*;
use super::tokenizer::{PromptRules, Tokenizer};
use super::ConfigError;

/// The feature vocabulary `/v1/models` publishes.
pub const FEATURES: &[&str] = &[
    "tools",
    "json_mode",
    "structured_outputs",
    "reasoning",
    "reasoning_effort",
];
pub const MODALITIES: &[&str] = &["text", "image", "audio", "video"];

/// Turns spans into line numbers for error messages.
pub(super) struct Source<'a> {
    pub text: &'a str,
}

impl Source<'_> {
    pub(super) fn err<T>(
        &self,
        span: Range<usize>,
        path: String,
        message: String,
    ) -> Result<T, ConfigError> {
        let line = (span != (0..0)).then(|| line_of(self.text, span.start));
        Err(ConfigError {
            file: None,
            line,
            path,
            message,
        })
    }
}

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

pub(super) fn validate(raw: RawConfig, src: &Source) -> Result<Snapshot, ConfigError> {
    let server = ServerSettings {
        listen: listen_addr(src, &raw.server.listen, "server.listen")?,
        max_body_bytes: positive(src, &raw.server.max_body_bytes, "server.max_body_bytes")?,
        threads: nonzero(src, &raw.server.threads, "server.threads")?,
        grace_period: Duration::from_secs(raw.server.grace_period_secs),
        client_write_timeout: Duration::from_millis(positive(
            src,
            &raw.server.client_write_timeout_ms,
            "server.client_write_timeout_ms",
        )?),
        upstream_keepalive_pool_size: nonzero(
            src,
            &raw.server.upstream_keepalive_pool_size,
            "server.upstream_keepalive_pool_size",
        )?,
        reload_on_change: raw.server.reload_on_change,
        metadata_rpm: positive(src, &raw.server.metadata_rpm, "server.metadata_rpm")?,
        head_timeout: Duration::from_millis(positive(
            src,
            &raw.server.head_timeout_ms,
            "server.head_timeout_ms",
        )?),
        body_pace: BodyPace {
            grace: Duration::from_millis(positive(
                src,
                &raw.server.body_timeout_ms,
                "server.body_timeout_ms",
            )?),
            min_rate: nonzero_u64(
                src,
                &raw.server.body_min_bytes_per_sec,
                "server.body_min_bytes_per_sec",
            )?,
        },
    };
    let admin = AdminSettings {
        listen: listen_addr(src, &raw.admin.listen, "admin.listen")?,
    };
    let (public, private) = (server.listen, admin.listen);
    let overlap = public.port() != 0
        && public.port() == private.port()
        && (public.ip() == private.ip()
            || public.ip().is_unspecified()
            || private.ip().is_unspecified());
    if overlap {
        return src.err(
            raw.admin.listen.span(),
            "admin.listen".into(),
            format!("{private} is also where server.listen ({public}) listens; give the admin listener another port"),
        );
    }

    let state = state(&raw.state, src)?;

    let alerts = alert_settings(src, &raw.alerts)?;
    let asynchronous = super::asynchronous::async_settings(src, &raw.asynchronous)?;
    let cluster = super::cluster::cluster(raw.cluster.as_ref(), src)?;

    let mut pools = Vec::with_capacity(raw.pools.len());
    let mut pool_index = HashMap::new();
    for (i, p) in raw.pools.iter().enumerate() {
        let path = format!("pools[{i}]");
        let pool = pool(src, p, &path)?;
        if pool_index.insert(pool.name.clone(), i).is_some() {
            return src.err(
                p.name.span(),
                format!("{path}.name"),
                format!(
                    "pool {:?} is defined twice; pool names must be unique",
                    pool.name
                ),
            );
        }
        pools.push(pool);
    }

    let mut models = Vec::with_capacity(raw.models.len());
    let mut model_index = HashMap::new();
    for (i, m) in raw.models.iter().enumerate() {
        let path = format!("models[{i}]");
        let model = model(src, m, &path, &pool_index)?;
        if model_index.insert(model.slug.to_string(), i).is_some() {
            return src.err(
                m.slug.span(),
                format!("{path}.slug"),
                format!(
                    "model {:?} is defined twice; slugs must be unique",
                    model.slug
                ),
            );
        }
        models.push(Arc::new(model));
    }

    let (deployed_models, deployed_index) =
        super::deployed::deployed_models(src, &raw.deployed_models, &pool_index)?;

    let mut keys = HashMap::new();
    let mut ids = HashSet::new();
    for (i, k) in raw.keys.iter().enumerate() {
        let path = format!("keys[{i}]");
        let (digest, key) = super::keys::key(src, k, &path, &models, &deployed_models)?;
        if !ids.insert(key.id.clone()) {
            return src.err(
                k.id.span(),
                format!("{path}.id"),
                format!("key id {:?} is used twice; ids must be unique", key.id),
            );
        }
        if keys.insert(digest, Arc::new(key)).is_some() {
            return src.err(
                k.sha256.span(),
                format!("{path}.sha256"),
                "this digest belongs to another key too; generate a fresh key with `tollgate key new`"
                    .into(),
            );
        }
    }

    Ok(Snapshot {
        server,
        admin,
        state,
        alerts,
        asynchronous,
        pools,
        models,
        model_index,
        keys,
        deployed_models,
        deployed_index,
        cluster,
    })
}

/// The `[state]` section.
pub fn state(raw: &RawState, src: &Source) -> Result<StateSettings, ConfigError> {
    Ok(StateSettings {
        dir: match raw.dir.get_ref().as_str() {
            "" => {
                return src.err(
                    raw.dir.span(),
                    "state.dir".into(),
                    "must not be empty".into(),
                )
            }
            d => d.into(),
        },
        ledger: raw.ledger,
    })
}

fn listen_addr(src: &Source, v: &Spanned<String>, path: &str) -> Result<SocketAddr, ConfigError> {
    match v.get_ref().parse::<SocketAddr>() {
        Ok(a) => Ok(a),
        Err(_) => src.err(
            v.span(),
            path.into(),
            format!(
                "{:?} is not an IP:port address (e.g. \"127.0.0.1:8080\")",
                v.get_ref()
            ),
        ),
    }
}

fn positive(src: &Source, v: &Spanned<u64>, path: &str) -> Result<u64, ConfigError> {
    match *v.get_ref() {
        0 => src.err(v.span(), path.into(), "must be greater than 0".into()),
        n => Ok(n),
    }
}

fn nonzero_u64(src: &Source, v: &Spanned<u64>, path: &str) -> Result<NonZeroU64, ConfigError> {
    match NonZeroU64::new(*v.get_ref()) {
        Some(n) => Ok(n),
        None => src.err(v.span(), path.into(), "must be greater than 0".into()),
    }
}

fn nonzero(src: &Source, v: &Spanned<usize>, path: &str) -> Result<NonZeroUsize, ConfigError> {
    match NonZeroUsize::new(*v.get_ref()) {
        Some(n) => Ok(n),
        None => src.err(v.span(), path.into(), "must be at least 1".into()),
    }
}

fn millis(src: &Source, v: &Spanned<u64>, path: String) -> Result<Duration, ConfigError> {
    match *v.get_ref() {
        0 => src.err(v.span(), path, "must be at least 1 (milliseconds)".into()),
        n => Ok(Duration::from_millis(n)),
    }
}

fn pool(src: &Source, p: &RawPool, path: &str) -> Result<Pool, ConfigError> {
    let name = p.name.get_ref().clone();
    if name.is_empty() {
        return src.err(
            p.name.span(),
            format!("{path}.name"),
            "must not be empty".into(),
        );
    }
    let mut replicas = Vec::with_capacity(p.replicas.len());
    for (j, r) in p.replicas.iter().enumerate() {
        let rpath = format!("{path}.replicas[{j}]");
        let addr = super::fleet::replica_addr(r.get_ref())
            .or_else(|m| src.err(r.span(), rpath.clone(), m))?;
        if replicas.contains(&addr) {
            return src.err(
                r.span(),
                rpath,
                format!("{addr} is listed twice in this pool"),
            );
        }
        replicas.push(addr);
    }
    let upstream_key = match &p.upstream_api_key_env {
        None => None,
        Some(var) => match std::env::var(var.get_ref()) {
            Ok(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic()) => {
                Some(Secret::new(v))
            }
            Ok(v) if !v.is_empty() => {
                return src.err(
                    var.span(),
                    format!("{path}.upstream_api_key_env"),
                    format!(
                        "environment variable {} holds characters an HTTP header cannot carry (spaces, control characters or non-ASCII); check its value",
                        var.get_ref()
                    ),
                )
            }
            _ => {
                return src.err(
                    var.span(),
                    format!("{path}.upstream_api_key_env"),
                    format!(
                        "environment variable {} is not set or empty; set it to the replicas' API key or remove this line",
                        var.get_ref()
                    ),
                )
            }
        },
    };
    let max_attempts = match NonZeroU32::new(*p.max_attempts.get_ref()) {
        Some(n) => n,
        None => {
            return src.err(
                p.max_attempts.span(),
                format!("{path}.max_attempts"),
                "must be at least 1 (the first attempt counts)".into(),
            )
        }
    };
    Ok(Pool {
        name,
        replicas,
        upstream_key,
        timeouts: timeouts(src, &p.timeouts, &format!("{path}.timeouts"))?,
        max_attempts,
        fleet: fleet(
            src,
            RawFleet {
                policy: &p.policy,
                load_factor: &p.load_factor,
                health: &p.health,
                ejection: &p.ejection,
                slow_start_ms: &p.slow_start_ms,
                max_inflight_per_replica: &p.max_inflight_per_replica,
                queue: &p.queue,
            },
            path,
        )?,
    })
}

fn timeouts(src: &Source, t: &RawTimeouts, path: &str) -> Result<Timeouts, ConfigError> {
    Ok(Timeouts {
        connect: millis(src, &t.connect_ms, format!("{path}.connect_ms"))?,
        first_byte: millis(src, &t.first_byte_ms, format!("{path}.first_byte_ms"))?,
        idle: millis(src, &t.idle_ms, format!("{path}.idle_ms"))?,
        total: millis(src, &t.total_ms, format!("{path}.total_ms"))?,
        pool_idle: millis(src, &t.pool_idle_ms, format!("{path}.pool_idle_ms"))?,
    })
}

fn model(
    src: &Source,
    m: &RawModel,
    path: &str,
    pools: &HashMap<String, usize>,
) -> Result<Model, ConfigError> {
    let slug = m.slug.get_ref().clone();
    if slug.is_empty() || slug.contains('*') || slug.chars().any(char::is_whitespace) {
        return src.err(
            m.slug.span(),
            format!("{path}.slug"),
            format!("{slug:?} is not a usable slug: it must be non-empty, without spaces or '*'"),
        );
    }
    let Some(&pool) = pools.get(m.pool.get_ref()) else {
        let mut known: Vec<_> = pools.keys().map(|k| format!("{k:?}")).collect();
        known.sort();
        return src.err(
            m.pool.span(),
            format!("{path}.pool"),
            format!(
                "{:?} is not a defined pool (defined: {})",
                m.pool.get_ref(),
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            ),
        );
    };
    let price = match &m.price {
        None => Price::default(),
        Some(p) => {
            let r = p.get_ref();
            let price = Price {
                input_per_mtok: r.input_per_mtok,
                cached_input_per_mtok: r.cached_input_per_mtok.unwrap_or(r.input_per_mtok),
                output_per_mtok: r.output_per_mtok,
            };
            let all = [
                price.input_per_mtok,
                price.cached_input_per_mtok,
                price.output_per_mtok,
            ];
            if all.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return src.err(
                    p.span(),
                    format!("{path}.price"),
                    "prices are USD per million tokens and must be finite and >= 0".into(),
                );
            }
            // Costs are exact integers of nano-dollars per token: 0.001 USD per million.
            if let Some(v) = all.iter().find(|v| {
                let nanos = **v * 1000.0;
                (nanos - nanos.round()).abs() > 1e-6 || nanos > 1e12
            }) {
                return src.err(
                    p.span(),
                    format!("{path}.price"),
                    format!("{v} has more than 3 decimals (or is over 1e9): prices are kept exactly in steps of 0.001 USD per million tokens (one nano-dollar per token); round it, e.g. to {:.3}", (v * 1000.0).round() / 1000.0),
                );
            }
            price
        }
    };
    let positive_u32 = |v: &Option<Spanned<u32>>, field: &str| match v {
        Some(s) if *s.get_ref() == 0 => src.err(
            s.span(),
            format!("{path}.{field}"),
            "must be at least 1 (tokens)".into(),
        ),
        other => Ok(other.as_ref().map(|s| *s.get_ref())),
    };
    let context_tokens = positive_u32(&m.context_tokens, "context_tokens")?;
    let max_output_tokens = positive_u32(&m.max_output_tokens, "max_output_tokens")?;
    if let (Some(context), Some(max), Some(span)) = (
        context_tokens,
        max_output_tokens,
        m.max_output_tokens.as_ref().map(Spanned::span),
    ) {
        if max > context {
            return src.err(
                span,
                format!("{path}.max_output_tokens"),
                format!("{max} is more than context_tokens ({context}): no request could use it; lower it or raise context_tokens"),
            );
        }
    }
    let upstream_model = match &m.upstream_model {
        Some(u) if u.get_ref().trim().is_empty() => {
            return src.err(
                u.span(),
                format!("{path}.upstream_model"),
                "must name the model the replica serves (vLLM --served-model-name); leave it out to send the slug".into(),
            )
        }
        Some(u) => u.get_ref().clone(),
        None => slug.clone(),
    };
    let features = vocabulary(src, &m.features, FEATURES, &format!("{path}.features"))?;
    let input_modalities = match &m.input_modalities {
        None => vec!["text"],
        Some(list) => vocabulary(src, list, MODALITIES, &format!("{path}.input_modalities"))?,
    };
    let media_urls = match &m.media_urls {
        None => MediaUrls::PublicOnly,
        Some(v) => match v.get_ref().as_str() {
            "public_only" => MediaUrls::PublicOnly,
            "any" => MediaUrls::Any,
            "none" => MediaUrls::None,
            other => {
                return src.err(
                    v.span(),
                    format!("{path}.media_urls"),
                    format!("{other:?} is not one of: public_only, any, none"),
                )
            }
        },
    };
    let reasoning_switch = match &m.reasoning_switch {
        None => ThinkingStyle::ChatTemplateKwargs,
        Some(v) => match v.get_ref().as_str() {
            "chat_template_kwargs" => ThinkingStyle::ChatTemplateKwargs,
            "chat_template_args" => ThinkingStyle::ChatTemplateArgs,
            "reasoning_effort" => ThinkingStyle::ReasoningEffort,
            "none" => ThinkingStyle::Ignore,
            other => {
                return src.err(
                    v.span(),
                    format!("{path}.reasoning_switch"),
                    format!("{other:?} is not one of: chat_template_kwargs, chat_template_args, reasoning_effort, none"),
                )
            }
        },
    };
    let default_max_tokens = match &m.default_max_tokens {
        Some(v) if *v.get_ref() == 0 => {
            return src.err(
                v.span(),
                format!("{path}.default_max_tokens"),
                "must be at least 1 (tokens)".into(),
            )
        }
        Some(v) => match max_output_tokens {
            Some(max) if *v.get_ref() > max => {
                return src.err(
                    v.span(),
                    format!("{path}.default_max_tokens"),
                    format!("{} is more than max_output_tokens ({max}); lower it or raise max_output_tokens", v.get_ref()),
                )
            }
            _ => *v.get_ref(),
        },
        None => max_output_tokens.unwrap_or(4096),
    };
    let prompt = prompt_rules(src, m, path)?;
    Ok(Model {
        prompt,
        default_max_tokens,
        limits: limits(
            src,
            &m.limits.rpm,
            &m.limits.tpm,
            &m.limits.max_concurrent,
            &format!("{path}.limits"),
        )?,
        reasoning_switch,
        upstream_model,
        slug: slug.into(),
        pool,
        display_name: m.display_name.clone(),
        description: m.description.clone(),
        owned_by: m.owned_by.clone().unwrap_or_else(|| "tollgate".into()),
        created: m.created.unwrap_or(0),
        context_tokens,
        max_output_tokens,
        token_prices: TokenPrices::from(&price),
        price,
        features,
        input_modalities,
        media_urls,
    })
}

/// `template_overhead`, `max_image_tokens` and `tokenizer`: how prompts are counted.
fn prompt_rules(src: &Source, m: &RawModel, path: &str) -> Result<PromptRules, ConfigError> {
    let mut rules = PromptRules::default();
    if let Some(o) = &m.template_overhead {
        rules.per_message = o.per_message.unwrap_or(rules.per_message);
        rules.per_request = o.per_request.unwrap_or(rules.per_request);
    }
    if let Some(v) = &m.max_image_tokens {
        if *v.get_ref() == 0 {
            return src.err(
                v.span(),
                format!("{path}.max_image_tokens"),
                "must be at least 1 (tokens): the most tokens one image can become".into(),
            );
        }
        rules.max_image_tokens = *v.get_ref();
    }
    if let Some(file) = &m.tokenizer {
        let loaded = Tokenizer::load(std::path::Path::new(file.get_ref()))
            .or_else(|e| src.err(file.span(), format!("{path}.tokenizer"), e))?;
        rules.tokenizer = Some(loaded);
    }
    Ok(rules)
}

fn vocabulary(
    src: &Source,
    list: &[Spanned<String>],
    known: &[&'static str],
    path: &str,
) -> Result<Vec<&'static str>, ConfigError> {
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        match known.iter().find(|k| **k == item.get_ref().as_str()) {
            Some(k) if !out.contains(k) => out.push(*k),
            Some(_) => {}
            None => {
                return src.err(
                    item.span(),
                    format!("{path}[{i}]"),
                    format!("{:?} is not one of: {}", item.get_ref(), known.join(", ")),
                )
            }
        }
    }
    Ok(out)
}
