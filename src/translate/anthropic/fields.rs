//! Reading typed fields out of request JSON, each failure naming the field's path.

use serde_json::{Map, Number, Value};

use crate::translate::RequestError;

pub(super) type Object = Map<String, Value>;

/// `parent.key`, or `key` at the top level.
pub(super) fn path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// The value at `path` must be an object.
pub(super) fn object<'a>(value: &'a Value, path: &str) -> Result<&'a Object, RequestError> {
    value
        .as_object()
        .ok_or_else(|| RequestError::wrong_type(path, "an object"))
}

/// A field that is present and not `null`.
fn present<'a>(obj: &'a Object, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// A required string field; `hint` says what to send.
pub(super) fn string<'a>(
    obj: &'a Object,
    parent: &str,
    key: &str,
    hint: &str,
) -> Result<&'a str, RequestError> {
    match present(obj, key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(RequestError::wrong_type(&path(parent, key), "a string")),
        None => Err(RequestError::missing(&path(parent, key), hint)),
    }
}

pub(super) fn opt_string<'a>(
    obj: &'a Object,
    parent: &str,
    key: &str,
) -> Result<Option<&'a str>, RequestError> {
    match present(obj, key) {
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(RequestError::wrong_type(&path(parent, key), "a string")),
        None => Ok(None),
    }
}

pub(super) fn opt_bool(
    obj: &Object,
    parent: &str,
    key: &str,
) -> Result<Option<bool>, RequestError> {
    match present(obj, key) {
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(RequestError::wrong_type(&path(parent, key), "a boolean")),
        None => Ok(None),
    }
}

pub(super) fn opt_number(
    obj: &Object,
    parent: &str,
    key: &str,
) -> Result<Option<Number>, RequestError> {
    match present(obj, key) {
        Some(Value::Number(n)) => Ok(Some(n.clone())),
        Some(_) => Err(RequestError::wrong_type(&path(parent, key), "a number")),
        None => Ok(None),
    }
}

/// An optional non-negative integer.
pub(super) fn opt_u64(obj: &Object, parent: &str, key: &str) -> Result<Option<u64>, RequestError> {
    match present(obj, key) {
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| RequestError::wrong_type(&path(parent, key), "a non-negative integer")),
        Some(_) => Err(RequestError::wrong_type(
            &path(parent, key),
            "a non-negative integer",
        )),
        None => Ok(None),
    }
}

/// An optional integer from 1 to `u32::MAX`.
pub(super) fn opt_positive_u32(
    obj: &Object,
    parent: &str,
    key: &str,
) -> Result<Option<u32>, RequestError> {
    let Some(n) = opt_u64(obj, parent, key)? else {
        return Ok(None);
    };
    match u32::try_from(n) {
        Ok(0) => Err(RequestError::invalid_value(
            &path(parent, key),
            "must be at least 1.",
        )),
        Ok(n) => Ok(Some(n)),
        Err(_) => Err(RequestError::invalid_value(
            &path(parent, key),
            &format!("must be at most {}.", u32::MAX),
        )),
    }
}

/// An optional array; `None` when absent or `null`.
pub(super) fn opt_array<'a>(
    obj: &'a Object,
    parent: &str,
    key: &str,
    expected: &str,
) -> Result<Option<&'a [Value]>, RequestError> {
    match present(obj, key) {
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(_) => Err(RequestError::wrong_type(&path(parent, key), expected)),
        None => Ok(None),
    }
}

/// An optional array of strings.
pub(super) fn opt_strings(
    obj: &Object,
    parent: &str,
    key: &str,
) -> Result<Vec<String>, RequestError> {
    let Some(items) = opt_array(obj, parent, key, "an array of strings")? else {
        return Ok(Vec::new());
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(s.clone()),
            _ => Err(RequestError::wrong_type(
                &format!("{}[{i}]", path(parent, key)),
                "a string",
            )),
        })
        .collect()
}
