use super::*;

fn pool() -> Pool {
    Pool::new(Arc::from("team-a"), Arc::new(KeyNames::of("team-a")), None)
}

/// rpm, tpm and max_concurrent on the key, and a budget.
fn terms() -> Terms {
    Terms {
        key: [600, 100_000, 10],
        model: None,
        budget: Some((1_000_000, true, false)),
    }
}

const HASH: &str = "tollgate:k:team-a:b:0";

fn need() -> Need<'static> {
    Need {
        tokens: 100,
        nanos: 1_000,
        budget: Some(HASH),
    }
}

fn grant(units: u64, slots: u64, nanos: u64) -> Granted {
    Granted {
        sec: 1_000,
        ms: 0,
        units,
        tokens: 100,
        slots,
        nanos,
        unit_nanos: 1_000,
        key_requests: units,
        key_tokens: units * 100,
    }
}

/// A first request: nothing held, a grant of `g`, the request admitted from it.
fn granted(p: &Pool, g: &Granted, at: Instant) -> Held {
    let (held, ask) = p.take(1, terms(), &need(), at).err().expect("asks Redis");
    p.granted(1, g, held, &ask, &need(), "n:e1:7", Some(HASH), at)
        .expect("same connection")
}

#[test]
fn a_grant_admits_its_units_here_within_its_second_only() {
    let p = pool();
    let at = Instant::now();
    let first = granted(&p, &grant(4, 4, 4_000), at);
    assert_eq!(first.slot.as_deref(), Some("n:e1:7#1"));
    for _ in 0..3 {
        let held = p.take(1, terms(), &need(), at).ok().expect("admitted here");
        assert_eq!(held.rate, Some(1_000));
        assert!(held.slot.is_some() && held.nanos);
    }
    // The grant's units are spent; so is its second, a second later.
    assert!(p.take(1, terms(), &need(), at).is_err());
    let p = pool();
    granted(&p, &grant(4, 4, 4_000), at);
    let later = at + Duration::from_millis(1_000);
    let (held, ask) = p
        .take(1, terms(), &need(), later)
        .err()
        .expect("asks Redis");
    assert_eq!(
        held.rate, None,
        "a unit of a second that is over is never used"
    );
    assert!(
        held.slot.is_some() && held.nanos,
        "slots and holds outlive it"
    );
    assert!(ask.units >= FEWEST_UNITS);
}

#[test]
fn an_idle_tick_gives_back_the_units_slots_and_nano_dollars_left() {
    let p = pool();
    let at = Instant::now();
    let held = granted(&p, &grant(4, 3, 4_000), at);
    p.settle(1, held, 100, 1_000, 60, 700, Some((HASH, &budget(), 0)));
    // Busy since the last tick: kept.
    let owed = p.tick(1, at);
    assert_eq!(owed.len(), 1);
    assert!(owed[0].slots.is_empty());
    assert_eq!((owed[0].spent, owed[0].leaving), (700, 700));
    // Idle, and its second over: everything goes back.
    let owed = p.tick(1, at + Duration::from_secs(1));
    assert_eq!(owed.len(), 1);
    let r = &owed[0];
    assert_eq!(r.slots.len(), 3);
    assert_eq!(r.corrections, vec![(1_000, 3, 340)]);
    assert_eq!(r.leaving, 3_000 + 300);
    assert_eq!(r.budget.as_deref(), Some(HASH));
    assert!(p.tick(1, at + Duration::from_secs(2)).is_empty());
}

#[test]
fn a_busy_pool_tells_redis_what_it_spent_at_most_once_a_second() {
    let p = pool();
    let at = Instant::now();
    let spend = || Some((HASH, &BUDGET, 0));
    let held = granted(&p, &grant(8, 3, 8_000), at);
    p.settle(1, held, 100, 1_000, 100, 500, spend());
    assert_eq!(p.tick(1, at).len(), 1, "the first tick sends");
    for ms in [100, 500, 900] {
        let held = p.take(1, terms(), &need(), at).ok().expect("admitted here");
        p.settle(1, held, 100, 1_000, 100, 500, spend());
        let now = at + Duration::from_millis(ms);
        assert!(p.tick(1, now).is_empty(), "spend alone waits ({ms} ms)");
    }
    let owed = p.tick(1, at + Duration::from_secs(1));
    assert_eq!(owed.len(), 1);
    // Idle by then too: the hold's 6,000 free go back with the spend.
    assert_eq!((owed[0].spent, owed[0].leaving), (1_500, 1_500 + 6_000));
}

#[test]
fn a_tight_pool_gives_back_what_a_request_frees_at_once() {
    let p = pool();
    let at = Instant::now();
    // Asked for more than one request's worth, given one: a limit is near.
    let held = granted(&p, &grant(1, 1, 1_000), at);
    let owed = p.settle(1, held, 100, 1_000, 100, 400, Some((HASH, &budget(), 0)));
    assert_eq!(owed.len(), 1);
    assert_eq!(owed[0].slots, vec!["n:e1:7#1".to_string()]);
    assert_eq!((owed[0].spent, owed[0].leaving), (400, 1_000));
}

#[test]
fn a_new_connection_gives_back_the_old_holdings_and_never_uses_them() {
    let p = pool();
    let at = Instant::now();
    let running = granted(&p, &grant(4, 2, 4_000), at);
    let (held, _) = p.take(2, terms(), &need(), at).err().expect("asks Redis");
    assert!(held.rate.is_none() && held.slot.is_none() && !held.nanos);
    let owed = p.tick(2, at);
    let old: Vec<_> = owed.iter().filter(|r| r.epoch == 1).collect();
    assert!(old.iter().any(|r| r.release && r.leaving == 3_000));
    assert!(old.iter().any(|r| r.slots.len() == 1));
    // A request of the old connection settles as spend alone, its slot given back.
    let owed = p.settle(1, running, 100, 1_000, 100, 900, Some((HASH, &budget(), 0)));
    assert!(owed.is_empty());
    let owed = p.tick(2, at);
    assert!(owed.iter().any(|r| r.spent == 900 && r.leaving == 0));
    assert!(owed.iter().any(|r| r.slots == vec!["n:e1:7#1".to_string()]));
    // A grant answered over the old connection is not used.
    let (held, ask) = p.take(2, terms(), &need(), at).err().expect("asks Redis");
    assert!(p
        .granted(
            1,
            &grant(4, 2, 4_000),
            held,
            &ask,
            &need(),
            "n:e1:9",
            Some(HASH),
            at
        )
        .is_none());
}

static BUDGET: Budget = Budget {
    nanos: 1_000_000,
    period: crate::config::Period::Total,
    enforce: true,
    clamp_max_tokens: false,
    alert_at: Vec::new(),
};

fn budget() -> Budget {
    BUDGET.clone()
}
