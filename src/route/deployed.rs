//! Deployed models: which model, target and action a request names, and the deployment that
//! serves it. The model is named by the host (`model-{id}.<any domain>`) or by a path prefix
//! (`/model/{id}/…`, for setups without wildcard DNS); the rest of the path names a target
//! (production, an environment, development, one deployment) and what to do there (predict,
//! a `sync/…` pass-through, wake).

use std::sync::Arc;

use crate::config::{DeployedModel, Key, Snapshot};

/// A request for a deployed model, as its host and path name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call<'a> {
    pub model: &'a str,
    /// `None` for `/wake`, which wakes production.
    pub target: Option<Target<'a>>,
    /// `None`: a path under the model that names no action.
    pub action: Option<Action<'a>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// `/production/…`, and `/environments/{env}/…` (production among them).
    Environment(&'a str),
    Development,
    Deployment(&'a str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    Predict,
    /// `sync/{route…}`: the path on the replica, from its `/`.
    Sync(&'a str),
    Wake,
    /// `async_predict`: queue the body's `model_input` for a run later.
    AsyncPredict,
    /// `async_queue_status`, on a target or (production) on the model.
    AsyncQueueStatus,
    /// `/async_request/{id}`: status (GET) or cancel (DELETE).
    AsyncRequest(&'a str),
    /// `/async_request/{id}/output`: the kept output.
    AsyncOutput(&'a str),
}

impl Action<'_> {
    /// The method the action takes; `None`: any.
    pub fn method(self) -> Option<&'static str> {
        match self {
            Action::Predict | Action::Wake | Action::AsyncPredict => Some("POST"),
            Action::AsyncQueueStatus | Action::AsyncOutput(_) => Some("GET"),
            Action::Sync(_) => None,
            Action::AsyncRequest(_) => Some("GET, DELETE"),
        }
    }

    /// The label of metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Action::Predict => "predict",
            Action::Sync(_) => "sync",
            Action::Wake => "wake",
            Action::AsyncPredict => "async_predict",
            Action::AsyncQueueStatus => "async_queue_status",
            Action::AsyncRequest(_) => "async_request",
            Action::AsyncOutput(_) => "async_output",
        }
    }
}

/// The deployed model a host or path names, and the path after its prefix. `None`: the
/// request is not for a deployed model (the Model API serves it).
pub fn address<'a>(host: Option<&'a str>, path: &'a str) -> Option<Call<'a>> {
    let by_host = host
        .and_then(|h| h.strip_prefix("model-"))
        .and_then(|h| h.split_once('.'))
        .map(|(id, _)| id)
        .filter(|id| !id.is_empty());
    let (model, rest) = match by_host {
        Some(id) => (id, path),
        None => {
            let after = path.strip_prefix("/model/")?;
            match after.split_once('/') {
                Some((id, _)) => (id, &after[id.len()..]),
                None => (after, ""),
            }
        }
    };
    let (target, action) = parse(rest);
    Some(Call {
        model,
        target,
        action,
    })
}

/// The target and action a path after the model's prefix names.
fn parse(rest: &str) -> (Option<Target<'_>>, Option<Action<'_>>) {
    if rest == "/wake" {
        return (None, Some(Action::Wake));
    }
    if rest == "/async_queue_status" {
        return (None, Some(Action::AsyncQueueStatus));
    }
    if let Some((id, tail)) = named(rest, "/async_request/") {
        return match tail {
            "" => (None, Some(Action::AsyncRequest(id))),
            "/output" => (None, Some(Action::AsyncOutput(id))),
            _ => (None, None),
        };
    }
    let (target, tail) = if let Some(tail) = rest.strip_prefix("/production") {
        (Target::Environment("production"), tail)
    } else if let Some(tail) = rest.strip_prefix("/development") {
        (Target::Development, tail)
    } else if let Some((name, tail)) = named(rest, "/environments/") {
        (Target::Environment(name), tail)
    } else if let Some((name, tail)) = named(rest, "/deployment/") {
        (Target::Deployment(name), tail)
    } else {
        return (None, None);
    };
    let action = match tail {
        "/predict" => Some(Action::Predict),
        "/wake" => Some(Action::Wake),
        "/async_predict" => Some(Action::AsyncPredict),
        "/async_queue_status" => Some(Action::AsyncQueueStatus),
        "/sync" => Some(Action::Sync("/")),
        t => t
            .strip_prefix("/sync/")
            .map(|_| Action::Sync(&t["/sync".len()..])),
    };
    (Some(target), action)
}

/// `{prefix}{name}{tail}`: the name (one segment) and the tail from its `/`.
fn named<'a>(rest: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let after = rest.strip_prefix(prefix)?;
    let end = after.find('/').unwrap_or(after.len());
    (end > 0).then(|| (&after[..end], &after[end..]))
}

/// Why a deployed-model request cannot be served as named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployedError {
    ModelNotFound {
        model: String,
    },
    EnvironmentNotFound {
        model: String,
        environment: String,
    },
    DeploymentNotFound {
        model: String,
        deployment: String,
    },
    NoDevelopment {
        model: String,
    },
    /// A path under a known model that names no target or action.
    UnknownPath {
        model: String,
        path: String,
    },
    /// The key may not call this model, or this target of it.
    Forbidden {
        model: String,
        key_id: String,
    },
    /// Sync predict ran past the model's `predict_ms`.
    PredictTimeout {
        secs: u64,
    },
    /// No replica of the deployment became healthy within `wake_ms`.
    WakeTimeout {
        deployment: String,
        secs: u64,
    },
}

/// The deployment a call reaches.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub model: Arc<DeployedModel>,
    /// Index into `model.deployments`.
    pub deployment: usize,
    /// The environment named, if the target was one.
    pub environment: Option<String>,
}

/// The model of a call, known or not.
pub fn model<'s>(
    snapshot: &'s Snapshot,
    call: &Call,
) -> Result<&'s Arc<DeployedModel>, DeployedError> {
    snapshot
        .deployed_model(call.model)
        .ok_or_else(|| DeployedError::ModelNotFound {
            model: call.model.to_string(),
        })
}

/// The deployment a call's target names, if the key may call it.
pub fn resolve(
    model: &Arc<DeployedModel>,
    key: &Key,
    target: Option<Target>,
) -> Result<Resolved, DeployedError> {
    let named = |m: &str| m.to_string();
    let (deployment, environment) = match target.unwrap_or(Target::Environment("production")) {
        Target::Environment(env) => match model.environments.get(env) {
            Some(&d) => (d, Some(env.to_string())),
            None => {
                return Err(DeployedError::EnvironmentNotFound {
                    model: named(&model.id),
                    environment: env.to_string(),
                })
            }
        },
        Target::Development => match model.development {
            Some(d) => (d, None),
            None => {
                return Err(DeployedError::NoDevelopment {
                    model: named(&model.id),
                })
            }
        },
        Target::Deployment(id) => match model.deployments.iter().position(|d| &*d.id == id) {
            Some(d) => (d, None),
            None => {
                return Err(DeployedError::DeploymentNotFound {
                    model: named(&model.id),
                    deployment: id.to_string(),
                })
            }
        },
    };
    if !key.allows_deployed(&model.id, environment.as_deref()) {
        return Err(DeployedError::Forbidden {
            model: named(&model.id),
            key_id: key.id.to_string(),
        });
    }
    Ok(Resolved {
        model: model.clone(),
        deployment,
        environment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_is_named_by_host_or_by_path_prefix() {
        let by_host = address(
            Some("model-abcd1234.api.example.com"),
            "/production/predict",
        );
        let by_path = address(Some("gw:8080"), "/model/abcd1234/production/predict");
        for call in [by_host, by_path] {
            assert_eq!(
                call,
                Some(Call {
                    model: "abcd1234",
                    target: Some(Target::Environment("production")),
                    action: Some(Action::Predict),
                })
            );
        }
        assert_eq!(
            address(Some("api.example.com"), "/v1/chat/completions"),
            None
        );
        assert_eq!(address(Some("model-.example.com"), "/v1/models"), None);
    }

    #[test]
    fn every_target_and_action_parses() {
        let p = parse;
        assert_eq!(
            p("/environments/staging/predict"),
            (Some(Target::Environment("staging")), Some(Action::Predict))
        );
        assert_eq!(
            p("/development/wake"),
            (Some(Target::Development), Some(Action::Wake))
        );
        assert_eq!(
            p("/deployment/dep-a/sync/v1/models"),
            (
                Some(Target::Deployment("dep-a")),
                Some(Action::Sync("/v1/models"))
            )
        );
        assert_eq!(
            p("/production/sync"),
            (
                Some(Target::Environment("production")),
                Some(Action::Sync("/"))
            )
        );
        assert_eq!(p("/wake"), (None, Some(Action::Wake)));
        assert_eq!(p("/productionx/predict").1, None);
        assert_eq!(p("/production/predictx").1, None);
        assert_eq!(p("/environments//predict"), (None, None));
        assert_eq!(p(""), (None, None));
    }
}
