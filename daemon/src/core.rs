//! The core: owns the live rule set and its generation, and joins the pure
//! side (validation, compilation) to the kernel side (the data path) and the
//! disk (the state store). Every change goes through [`Core::change`]:
//! validate, compile, save, make live; a step that fails leaves the live
//! rules as they were.

use std::collections::{BTreeMap, HashMap};

use portcullis_common::{Counter, Reason};
use serde::Serialize;
use thiserror::Error;

use crate::{
    audit,
    compile::{self, CompileError, Image, Limits},
    dataplane::{self, Dataplane},
    rules::{RuleError, RuleSet},
    state::Store,
};

/// Why a change was refused. Each maps to an HTTP status in the API.
#[derive(Debug, Error)]
pub enum ChangeError {
    #[error("invalid rule set: {0}")]
    Invalid(#[from] RuleError),
    #[error("{0}")]
    TooLarge(#[from] CompileError),
    #[error(
        "generation {expected} expected, but {current} is live: someone else changed the rules; re-read and retry"
    )]
    Conflict { expected: u64, current: u64 },
    #[error("no rule with id {0:?}")]
    NotFound(String),
    #[error("a rule with id {0:?} exists already")]
    Exists(String),
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

/// The outcome of an accepted change.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Changed {
    pub generation: u64,
    pub hash: String,
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

impl From<Counter> for Count {
    fn from(c: Counter) -> Self {
        Count {
            packets: c.packets,
            bytes: c.bytes,
        }
    }
}

pub struct Core {
    dataplane: Dataplane,
    store: Store,
    limits: Limits,
    allow_ping: bool,
    rules: RuleSet,
    generation: u64,
    image: Image,
    /// Rule counters of earlier generations, by slot name, so totals
    /// survive changes.
    carried: HashMap<String, Count>,
    /// Protected interfaces and the XDP mode the kernel chose.
    pub interfaces: BTreeMap<String, String>,
    /// Writes refused for lack of permission (a metric to alert on).
    pub refused_writes: u64,
    pub audit: audit::Log,
}

impl Core {
    /// Makes `rules` live at `generation` (at start: restored or baseline).
    pub fn start(
        mut dataplane: Dataplane,
        store: Store,
        limits: Limits,
        allow_ping: bool,
        rules: RuleSet,
        generation: u64,
    ) -> anyhow::Result<Self> {
        let image = compile::compile(&rules, &limits)?;
        let audit = audit::Log::open(store.dir())?;
        store.save(&rules, generation)?;
        dataplane.apply(&image, allow_ping)?;
        Ok(Core {
            dataplane,
            store,
            limits,
            allow_ping,
            rules,
            generation,
            image,
            carried: HashMap::new(),
            interfaces: BTreeMap::new(),
            refused_writes: 0,
            audit,
        })
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn hash(&self) -> &str {
        &self.image.hash
    }

    /// Appends an audit record of `action` by `uid`/`pid` with `outcome`,
    /// at the current generation (fsynced before this returns).
    pub fn record(
        &mut self,
        uid: Option<u32>,
        pid: Option<i32>,
        action: &str,
        outcome: String,
    ) -> anyhow::Result<()> {
        let rules_hash = self.image.hash.clone();
        self.audit.append(audit::Event {
            uid,
            pid,
            action,
            outcome,
            generation: self.generation,
            rules_hash: &rules_hash,
        })?;
        Ok(())
    }

    /// Applies `edit` to a copy of the live rules and makes the result live.
    /// `expected`: the generation the caller read (compare-and-swap).
    pub fn change(
        &mut self,
        expected: Option<u64>,
        allow_ping: Option<bool>,
        edit: impl FnOnce(&mut RuleSet) -> Result<(), ChangeError>,
    ) -> Result<Changed, ChangeError> {
        if let Some(expected) = expected
            && expected != self.generation
        {
            return Err(ChangeError::Conflict {
                expected,
                current: self.generation,
            });
        }
        let mut next = self.rules.clone();
        edit(&mut next)?;
        next.validate()?;
        let image = compile::compile(&next, &self.limits)?;
        let allow_ping = allow_ping.unwrap_or(self.allow_ping);
        let generation = self.generation + 1;
        // Keep the counters of the generation about to go idle.
        let totals = self.rule_counters();
        // Durable first: a crash after this point restores the new set.
        self.store
            .save(&next, generation)
            .map_err(ChangeError::Internal)?;
        if let Err(e) = self.dataplane.apply(&image, allow_ping) {
            let _ = self.store.save(&self.rules, self.generation);
            return Err(ChangeError::Internal(e));
        }
        self.carried = totals;
        self.rules = next;
        self.image = image;
        self.generation = generation;
        self.allow_ping = allow_ping;
        Ok(Changed {
            generation,
            hash: self.image.hash.clone(),
        })
    }

    /// Packets and bytes per rule (by slot name: `rule:<id>`, `cluster:<id>`,
    /// `ssh`), over every generation since the daemon started.
    pub fn rule_counters(&mut self) -> HashMap<String, Count> {
        let mut totals = self.carried.clone();
        if let Ok(live) = self.dataplane.rule_counters(self.image.slots.len()) {
            for (slot, c) in self.image.slots.iter().zip(live).skip(1) {
                let t = totals.entry(slot.name.clone()).or_default();
                t.packets += c.packets;
                t.bytes += c.bytes;
            }
        }
        totals
    }

    /// Verdict counters by reason.
    pub fn reason_counters(&self) -> anyhow::Result<Vec<(Reason, Count)>> {
        Ok(dataplane::read_counters(self.dataplane.pin_dir())?
            .into_iter()
            .map(|(r, c)| (r, c.into()))
            .collect())
    }
}
