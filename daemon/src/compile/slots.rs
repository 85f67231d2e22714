//! An image's slots (one per rule, peer list or exemption: a counter and a
//! verdict each), kept by the core for the live set.
//!
//! The names live in one string: 100k `rule:<id>` names were 100k heap
//! blocks of their own, which outlived every change's garbage around them
//! and kept its pages from going back to the system.

use portcullis_common::RateLimit;

/// What a slot stands for, but its name: 8 bytes (the limit is a place in
/// `Slots::limits`, as only the rare rule with a `rate` has one).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Meta {
    /// A `SLOT_KIND_*` (two bits).
    kind: u8,
    dir: u8,
    /// 1 + the limit's index in `Slots::limits`; 0: none.
    limit: u32,
}

/// One slot as the callers read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot<'a> {
    /// `rule:<id>`, `cluster:<id>`, `ssh`, `other-clusters` (slot 0, unused
    /// as `SLOT_NONE`, has none).
    pub name: &'a str,
    pub kind: u32,
    pub dir: u8,
    /// An ingress rule's own rate limit (`rate`, `burst`), as the data path
    /// reads it from `RATE_LIMITS_g[slot]`.
    pub limit: Option<&'a RateLimit>,
}

/// The slots of an image, by index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slots {
    meta: Vec<Meta>,
    limits: Vec<RateLimit>,
    /// Every name, one after another; `ends[i]` is where slot `i`'s ends.
    names: String,
    ends: Vec<u32>,
}

impl Slots {
    pub fn len(&self) -> usize {
        self.meta.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// Slot `i`.
    pub fn get(&self, i: usize) -> Option<Slot<'_>> {
        let meta = self.meta.get(i)?;
        let limit = (meta.limit as usize).checked_sub(1);
        Some(Slot {
            name: crate::rules::span(&self.ends, i)
                .and_then(|r| self.names.get(r))
                .unwrap_or_default(),
            kind: u32::from(meta.kind),
            dir: meta.dir,
            limit: limit.and_then(|i| self.limits.get(i)),
        })
    }

    /// The slots in order of index.
    pub fn iter(&self) -> impl Iterator<Item = Slot<'_>> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    /// The index of the slot named `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.iter().position(|s| s.name == name)
    }

    /// Adds a slot; returns its index.
    pub(super) fn push(&mut self, name: &str, kind: u32, dir: u8) -> u32 {
        let index = self.meta.len() as u32;
        self.meta.push(Meta {
            kind: u8::try_from(kind).unwrap_or(u8::MAX),
            dir,
            limit: 0,
        });
        self.names.push_str(name);
        self.ends
            .push(u32::try_from(self.names.len()).unwrap_or(u32::MAX));
        index
    }

    /// Gives the slots of kind `kind` and direction `dir`, in order, the
    /// limits `limits` yields (one per such slot).
    pub(super) fn set_limits(
        &mut self,
        kind: u32,
        dir: u8,
        limits: impl IntoIterator<Item = Option<RateLimit>>,
    ) {
        let slots = self
            .meta
            .iter_mut()
            .skip(1)
            .filter(|m| u32::from(m.kind) == kind && m.dir == dir);
        for (meta, limit) in slots.zip(limits) {
            meta.limit = match limit {
                Some(limit) => {
                    self.limits.push(limit);
                    u32::try_from(self.limits.len()).unwrap_or(0)
                }
                None => 0,
            };
        }
    }

    /// Gives the slot pushed last the limit `limit` (so the limits stay
    /// in the order `set_limits` gives them).
    pub(super) fn limit_last(&mut self, limit: Option<RateLimit>) {
        if let (Some(limit), Some(meta)) = (limit, self.meta.last_mut()) {
            self.limits.push(limit);
            meta.limit = u32::try_from(self.limits.len()).unwrap_or(0);
        }
    }

    /// Gives back the spare capacity of a list built by pushing.
    pub(super) fn shrink_to_fit(&mut self) {
        self.meta.shrink_to_fit();
        self.limits.shrink_to_fit();
        self.names.shrink_to_fit();
        self.ends.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_limits_are_found_by_index() {
        let mut slots = Slots::default();
        assert_eq!(slots.push("", 0, 0), 0);
        assert_eq!(slots.push("ssh", 3, 1), 1);
        assert_eq!(slots.push("rule:a", 1, 1), 2);
        assert_eq!(slots.push("rule:b", 1, 2), 3);
        assert_eq!(slots.push("rule:c", 1, 1), 4);
        let limit = RateLimit {
            interval_ns: 7,
            ..Default::default()
        };
        slots.set_limits(1, 1, [None, Some(limit)]);
        assert_eq!(slots.len(), 5);
        assert_eq!(slots.get(0).map(|s| s.name), Some(""));
        assert_eq!(slots.get(3).map(|s| (s.name, s.dir)), Some(("rule:b", 2)));
        assert_eq!(slots.get(2).and_then(|s| s.limit), None);
        assert_eq!(slots.get(4).and_then(|s| s.limit), Some(&limit));
        assert_eq!(slots.get(5), None);
        assert_eq!(slots.position("rule:c"), Some(4));
        assert_eq!(slots.position("rule:"), None);
        let names: Vec<&str> = slots.iter().map(|s| s.name).collect();
        assert_eq!(names, ["", "ssh", "rule:a", "rule:b", "rule:c"]);
    }
}
