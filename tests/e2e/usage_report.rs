//! `GET /admin/usage` over a ledger of many keys and models across a year: a report past the
//! bound (buckets × groups) is refused saying how to narrow it, a large one comes a page at
//! a time, whole and in order, and tollgate's memory comes back once it has been read.

use std::collections::HashSet;

use serde_json::Value;

use crate::common::*;

const KEYS: usize = 20;
const MODELS: usize = 5;
const DAYS: i64 = 365;
/// 2025-01-01T00:00:00Z.
const YEAR_START_MS: i64 = 1_735_689_600_000;

/// One ledger row per key, model and day of 2025, at noon: what a year of traffic from 20
/// keys on 5 models leaves, written straight into the ledger file.
fn fill(gw: &Gateway) {
    let mut conn = gw.ledger();
    let tx = conn.transaction().unwrap();
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO usage (id, request_id, ts_ms, key_id, model, surface, status,
                 input_tokens, cached_input_tokens, output_tokens, reasoning_tokens,
                 cost_nanos, estimated, ttft_ms, duration_ms, replica)
                 VALUES (?1, 'r', ?2, ?3, ?4, 'chat_completions', 200, 100, 0, 10, 0, 65000, 0,
                 1.0, 2.0, NULL)",
            )
            .unwrap();
        let mut n = 0u64;
        for day in 0..DAYS {
            for k in 0..KEYS {
                for m in 0..MODELS {
                    n += 1;
                    let ts = YEAR_START_MS + day * 86_400_000 + 43_200_000;
                    insert
                        .execute(rusqlite::params![
                            format!("{ts:012x}{n:016x}"),
                            ts,
                            format!("key-{k:02}"),
                            format!("org/model-{m}"),
                        ])
                        .unwrap();
                }
            }
        }
    }
    tx.commit().unwrap();
}

/// `GET /admin/usage?{query}`: the status and the JSON answer.
async fn report(gw: &Gateway, query: &str) -> (u16, Value) {
    let r = client()
        .get(gw.admin_url(&format!("/admin/usage?{query}")))
        .send()
        .await
        .expect("admin answers");
    (r.status().as_u16(), r.json().await.expect("JSON answer"))
}

/// Every page of the report `query`, in order: its rows, and how many pages it took.
async fn all_pages(gw: &Gateway, query: &str) -> (Vec<Value>, usize) {
    let (mut rows, mut pages, mut cursor) = (Vec::new(), 0, None::<String>);
    loop {
        let q = match &cursor {
            Some(c) => format!("{query}&cursor={c}"),
            None => query.to_string(),
        };
        let (status, page) = report(gw, &q).await;
        assert_eq!(status, 200, "{page:.300}");
        pages += 1;
        rows.extend(page["data"].as_array().expect("data").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return (rows, pages),
        }
    }
}

#[tokio::test]
async fn a_report_past_the_bound_is_refused_saying_how_to_narrow_it() {
    let gw = Gateway::start(&standard_config(&["127.0.0.1:9".parse().unwrap()], ""));
    fill(&gw);
    // The abuse run's query: 47,482 days × 100 groups.
    let all_time = "bucket=day&from=1970-01-01&to=2100-01-01";
    for (by, narrow) in [
        ("&by=key,model", "or group by key or by model alone"),
        ("&by=key", "or leave out by"),
        ("&by=model", "or leave out by"),
    ] {
        let (status, e) = report(&gw, &format!("{all_time}{by}")).await;
        assert_eq!(status, 400, "{by}");
        let message = e["error"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("this report would hold 47482 buckets × more than 2 groups, more than the 100000 rows one report may hold; narrow it: a larger bucket, a shorter range (from, to)"),
            "{message}"
        );
        assert!(message.ends_with(narrow), "{message}");
    }
    // Ungrouped, the same range fits, in pages; the year holds every request.
    let (rows, pages) = all_pages(&gw, all_time).await;
    assert_eq!((rows.len(), pages), (47_482, 5));
    let requests: u64 = rows.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
    assert_eq!(requests, DAYS as u64 * (KEYS * MODELS) as u64);

    for (query, want) in [
        (
            "limit=0",
            "limit \"0\" is not a number of rows from 1 to 10000",
        ),
        ("limit=10001", "from 1 to 10000"),
        ("cursor=nonsense", "is not one this report gave"),
        ("by=key&cursor=1.zz.", "is not one this report gave"),
    ] {
        let (status, e) = report(&gw, query).await;
        assert_eq!(status, 400, "{query}");
        let message = e["error"].as_str().unwrap_or_default();
        assert!(message.contains(want), "{query}: {message}");
    }
}

#[tokio::test]
async fn a_large_report_comes_whole_a_page_at_a_time_and_its_memory_goes_back() {
    let gw = Gateway::start(&standard_config(&["127.0.0.1:9".parse().unwrap()], ""));
    fill(&gw);
    let year = "bucket=day&from=2025-01-01&to=2026-01-01&by=key,model";
    // Warm up what any report uses once (the blocking pool, SQLite), then the baseline.
    let (status, _) = report(&gw, "bucket=day&from=2025-01-01&to=2025-01-03&by=key").await;
    assert_eq!(status, 200);
    let baseline = gw.rss_bytes();

    let (rows, pages) = all_pages(&gw, year).await;
    assert_eq!((rows.len(), pages), (36_500, 4), "365 days × 100 groups");
    let after = gw.rss_bytes();
    // Every row once, in order of day, key, model, each day's request of each group in it.
    let id = |r: &Value| {
        (
            r["start"].as_str().unwrap().to_string(),
            r["key_id"].as_str().unwrap().to_string(),
            r["model"].as_str().unwrap().to_string(),
        )
    };
    let ids: Vec<_> = rows.iter().map(id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 36_500);
    assert_eq!(ids[0].0, "2025-01-01T00:00:00Z");
    assert_eq!(
        ids[36_499],
        (
            "2025-12-31T00:00:00Z".into(),
            "key-19".into(),
            "org/model-4".into()
        )
    );
    assert!(rows
        .iter()
        .all(|r| r["requests"] == 1 && r["cost_micros"] == 65));

    // Pages of 7 rows, cut inside days, join into the same report as one page.
    let days = "bucket=day&from=2025-03-01&to=2025-03-04&by=key,model";
    let (whole, one) = all_pages(&gw, days).await;
    let (paged, many) = all_pages(&gw, &format!("{days}&limit=7")).await;
    assert_eq!((one, many), (1, 43));
    assert_eq!(paged, whole);

    // A page holds 10,000 rows at most, and its memory is handed back once it is written:
    // the process stays near where it was. (The year as one answer, before pages, took the
    // process from 57 to 174 MiB, where it stayed until the thread that built it ended.)
    let mib = |b: u64| b / (1024 * 1024);
    let grown = mib(after.saturating_sub(baseline));
    eprintln!(
        "usage report RSS: baseline {} MiB, after the year's 4 pages +{grown} MiB",
        mib(baseline)
    );
    assert!(grown < 8, "RSS grew {grown} MiB over {} MiB", mib(baseline));
}

/// `tollgate usage` on the same ledger: the same bound and message, and with `--json` the
/// admin API's rows of every page, in one answer.
#[tokio::test]
async fn the_usage_command_prints_the_whole_report_under_the_same_bound() {
    let gw = Gateway::start(&standard_config(&["127.0.0.1:9".parse().unwrap()], ""));
    fill(&gw);
    let usage = |range: [&str; 2], json: bool| {
        let config = gw.config_path();
        let mut args = vec!["usage", "-c", config.to_str().unwrap()];
        args.extend(["--from", range[0], "--to", range[1], "--bucket", "day"]);
        args.extend(["--by", "key,model"]);
        if json {
            args.push("--json");
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(&args)
            .output()
            .expect("runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = usage(["1970-01-01", "2100-01-01"], false);
    assert!(!ok && out.is_empty(), "{out:.300}");
    assert!(
        err.contains("this report would hold 47482 buckets × more than 2 groups"),
        "{err}"
    );

    let (ok, out, err) = usage(["2025-01-01", "2026-01-01"], true);
    assert!(ok, "{err}");
    let report: Value = serde_json::from_str(&out).expect("one JSON answer");
    assert_eq!(report["bucket"], "day");
    assert!(report.get("next_cursor").is_none());
    let rows = report["data"].as_array().unwrap();
    let (paged, _) = all_pages(&gw, "bucket=day&from=2025-01-01&to=2026-01-01&by=key,model").await;
    assert_eq!(rows.len(), 36_500);
    assert_eq!(rows, &paged, "the admin API's rows, every page");

    let (ok, out, err) = usage(["2025-03-01", "2025-03-02"], false);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 101, "a header and a row per group: {out:.300}");
    assert!(
        lines[1].starts_with("2025-03-01T00:00:00Z key-00"),
        "{out:.300}"
    );
}
