//! Pages of a usage report. A report is a grid: every bucket of the range, and in each one a
//! row per group (key and/or model), ordered by bucket start, then key, then model. One
//! answer holds at most a page of it, and a cursor names the row the next page starts at.
//! A cursor names a bucket and a group rather than a position, so a group that first
//! appears while a client pages through cannot shift the rows of the pages still to come.

/// Rows one report may hold in all, over every page (buckets × groups). Past this the
/// query is refused: the answer would be too large to be useful, and it says how to narrow.
pub const MAX_ROWS: u64 = 100_000;
/// Rows in one page: the most, and the default.
pub const PAGE_ROWS: usize = 10_000;

/// A row's group: its key id and its model, each `None` when the report is not grouped by it.
pub type GroupKey = (Option<String>, Option<String>);

/// Where a page starts: a bucket, and a group within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub start_ms: i64,
    pub group: GroupKey,
}

impl Cursor {
    /// Opaque to clients, and safe in a query string: the bucket start in Unix ms, then the
    /// key and the model in hex.
    pub fn encode(&self) -> String {
        let part = |s: &Option<String>| s.as_deref().map(hex::encode).unwrap_or_default();
        format!(
            "{}.{}.{}",
            self.start_ms,
            part(&self.group.0),
            part(&self.group.1)
        )
    }

    /// A cursor `encode` made for a report grouped by key (`by_key`) and model (`by_model`).
    pub fn decode(s: &str, by_key: bool, by_model: bool) -> Result<Cursor, String> {
        let bad = || {
            format!(
                "cursor {:?} is not one this report gave; pass the next_cursor of the previous page unchanged, or leave cursor out to start again",
                crate::vocab::echo(s)
            )
        };
        let mut parts = s.split('.');
        let (Some(start), Some(key), Some(model), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let text = |hexed: &str, grouped: bool| -> Result<Option<String>, String> {
            if !grouped {
                return match hexed {
                    "" => Ok(None),
                    _ => Err(bad()),
                };
            }
            let bytes = hex::decode(hexed).map_err(|_| bad())?;
            String::from_utf8(bytes).map(Some).map_err(|_| bad())
        };
        Ok(Cursor {
            start_ms: start.parse().map_err(|_| bad())?,
            group: (text(key, by_key)?, text(model, by_model)?),
        })
    }
}

/// A report's grid: `buckets` buckets of `bucket_ms` from `from_ms`, and its groups, sorted.
pub struct Grid<'a> {
    pub from_ms: i64,
    pub bucket_ms: i64,
    pub buckets: u64,
    pub groups: &'a [GroupKey],
}

impl Grid<'_> {
    pub fn rows(&self) -> u64 {
        self.buckets.saturating_mul(self.groups.len() as u64)
    }

    /// The rows `[first, end)` of the page that starts at `cursor` (the first page without
    /// one) and holds at most `limit` rows.
    pub fn page(&self, cursor: Option<&Cursor>, limit: usize) -> Result<(u64, u64), String> {
        let first = match cursor {
            None => 0,
            Some(c) => self.position(c)?,
        };
        let end = first.saturating_add(limit as u64).min(self.rows());
        Ok((first.min(end), end))
    }

    /// The bucket start and group of row `pos` (less than `rows()`).
    pub fn row(&self, pos: u64) -> (i64, &GroupKey) {
        let g = self.groups.len() as u64;
        let start = self.from_ms + (pos / g) as i64 * self.bucket_ms;
        (start, &self.groups[(pos % g) as usize])
    }

    /// The times `[from, to)` the rows `[first, end)` lie in (`first < end`).
    pub fn times(&self, (first, end): (u64, u64)) -> (i64, i64) {
        let g = self.groups.len() as u64;
        let bucket = |pos: u64| self.from_ms + (pos / g) as i64 * self.bucket_ms;
        (bucket(first), bucket(end - 1) + self.bucket_ms)
    }

    /// The cursor of the page starting at row `pos` (less than `rows()`).
    pub fn cursor_at(&self, pos: u64) -> Cursor {
        let (start_ms, group) = self.row(pos);
        Cursor {
            start_ms,
            group: group.clone(),
        }
    }

    /// The position of the first row at or after `c`: its bucket, and the first group not
    /// before its group.
    fn position(&self, c: &Cursor) -> Result<u64, String> {
        // Any i64 may come in a cursor: no arithmetic on it may overflow.
        let offset = c.start_ms.checked_sub(self.from_ms).unwrap_or(-1);
        let bucket = offset / self.bucket_ms;
        if offset < 0 || offset % self.bucket_ms != 0 || bucket as u64 >= self.buckets {
            return Err("cursor names a bucket outside this report's range; pass next_cursor with the same from, to, bucket and by as the page that gave it".into());
        }
        let group = self.groups.partition_point(|g| g < &c.group) as u64;
        Ok((bucket as u64)
            .saturating_mul(self.groups.len() as u64)
            .saturating_add(group))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(key: &str, model: &str) -> GroupKey {
        (Some(key.into()), Some(model.into()))
    }

    #[test]
    fn cursors_round_trip_and_strangers_are_refused() {
        let c = Cursor {
            start_ms: 3_600_000,
            group: g("team-a", "org/m.1"),
        };
        let text = c.encode();
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'));
        assert_eq!(Cursor::decode(&text, true, true).unwrap(), c);
        let by_model = Cursor {
            start_ms: 0,
            group: (None, Some("m".into())),
        };
        assert_eq!(
            Cursor::decode(&by_model.encode(), false, true).unwrap(),
            by_model
        );
        for bad in ["", "1.2", "x..", "1.zz.", "1.2.3.4", "5.6b.6d"] {
            let e = Cursor::decode(bad, false, true).unwrap_err();
            assert!(e.contains("next_cursor of the previous page"), "{bad}: {e}");
        }
    }

    #[test]
    fn pages_walk_the_grid_and_a_new_group_shifts_nothing_already_given() {
        let mut groups = vec![g("a", "m"), g("c", "m")];
        let grid = |groups: &[GroupKey]| {
            Grid {
                from_ms: 0,
                bucket_ms: 10,
                buckets: 3,
                groups,
            }
            .page_rows(3)
        };
        // 3 buckets × 2 groups in pages of 3: the second page starts in the middle bucket.
        let pages = grid(&groups);
        assert_eq!(pages.len(), 2);
        assert_eq!(pages[0][2], (10, g("a", "m")));
        assert_eq!(pages[1][0], (10, g("c", "m")));
        // Group "b" appears before the second page is asked for: that page still starts
        // where the first ended, and "b" is in every bucket from there on.
        let next = Grid {
            from_ms: 0,
            bucket_ms: 10,
            buckets: 3,
            groups: &groups,
        }
        .cursor_at(3);
        groups.insert(1, g("b", "m"));
        let grown = Grid {
            from_ms: 0,
            bucket_ms: 10,
            buckets: 3,
            groups: &groups,
        };
        let (first, end) = grown.page(Some(&next), 100).unwrap();
        assert_eq!(grown.row(first), (10, &g("c", "m")));
        assert_eq!((first, end), (5, 9));
        assert_eq!(grown.times((first, end)), (10, 30));
        // A cursor from another range is refused, however far off.
        for start_ms in [15, -10, 30, i64::MIN, i64::MAX] {
            let stray = Cursor {
                start_ms,
                group: g("a", "m"),
            };
            assert!(grown.page(Some(&stray), 10).is_err(), "{start_ms}");
        }
        let later = Grid {
            from_ms: 1_000,
            ..grown
        };
        let far = Cursor {
            start_ms: i64::MIN,
            group: g("a", "m"),
        };
        assert!(later.page(Some(&far), 10).is_err());
    }

    impl Grid<'_> {
        /// Every page of `limit` rows, as (bucket start, group) pairs.
        fn page_rows(&self, limit: usize) -> Vec<Vec<(i64, GroupKey)>> {
            let mut pages = Vec::new();
            let mut cursor = None;
            loop {
                let (first, end) = self.page(cursor.as_ref(), limit).unwrap();
                pages.push(
                    (first..end)
                        .map(|p| {
                            let (s, g) = self.row(p);
                            (s, g.clone())
                        })
                        .collect(),
                );
                if end == self.rows() {
                    return pages;
                }
                cursor = Some(self.cursor_at(end));
            }
        }
    }
}
