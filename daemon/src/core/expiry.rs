//! Expiring rules: a rule with `expires` is removed by the core at that
//! time (checked every second by the daemon, and at start, so a rule that
//! expired while the daemon was down goes as soon as it starts), audited
//! as expired, and the inbound flows it admitted are cut (their entries in
//! `INBOUND4`/`INBOUND6`, and a connection-table entry seeded for them):
//! new packets of those flows meet the rules, which no longer admit them.

use portcullis_common::{
    DIR_INGRESS, FlowKey, ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST, IPPROTO_ICMP, IPPROTO_ICMPV6,
    icmp_port, pclass_port, slot_admits,
};

use super::{Actor, ChangeError, Core, compile_with};
use crate::{compile::Image, dataplane::flow_remote, model::unix_now, rules::RuleSet};

/// Whether `image` admits the inbound flow `k` (as a new packet of it).
fn admits(image: &Image, k: &FlowKey) -> bool {
    let (pclass, port) = pclass_port(k.proto, k.local_port);
    let port = match k.proto {
        IPPROTO_ICMP => icmp_port(ICMP_ECHO_REQUEST, 0),
        IPPROTO_ICMPV6 => icmp_port(ICMPV6_ECHO_REQUEST, 0),
        _ => port,
    };
    let remote = flow_remote(k);
    slot_admits(image.answer(DIR_INGRESS, remote, pclass, port))
}

/// A configuration file's rule set without the rules whose expiry has
/// passed (they were, or would at once be, removed): what a reload applies.
pub(super) fn unexpired(mut set: RuleSet) -> RuleSet {
    for gone in set.take_expired(unix_now()) {
        tracing::warn!(rule = %gone.id, "reload: the file's rule has expired; not applied");
    }
    set
}

impl Core {
    /// Removes the rules whose time has come (from the live set, the
    /// baseline and a change awaiting confirmation, so neither a reload
    /// nor a rollback brings them back), cuts the inbound flows the rules
    /// no longer admit, and audits each removal. Returns the ids removed
    /// from the live set.
    pub fn expire_rules(&mut self) -> Result<Vec<String>, ChangeError> {
        let now = unix_now();
        self.expire_elsewhere(now)?;
        if !self.rules.has_expired(now) {
            return Ok(Vec::new());
        }
        let mut next = self.rules.unpack();
        let expired = next.take_expired(now);
        if expired.is_empty() {
            return Ok(Vec::new());
        }
        let image = compile_with(&next, &self.service, &self.limits)?;
        self.acting(Actor {
            action: "rule expired".into(),
            ..Default::default()
        });
        let live = self.make_live(next, image, self.allow_ping, None);
        self.acting(Actor::default());
        live?;
        let image = self.image.clone();
        let cut = self
            .dataplane
            .cut_inbound(|k| !admits(&image, k))
            .map_err(ChangeError::Internal)?;
        let mut ids = Vec::new();
        for r in expired {
            let when = r.expires.clone().unwrap_or_default();
            tracing::warn!(rule = %r.id, expires = %when, flows_cut = cut, "rule expired: removed");
            self.record(
                None,
                None,
                "rule expired",
                format!(
                    "removed rule {:?} (expired {when}); {cut} inbound flows cut",
                    r.id
                ),
            )
            .map_err(ChangeError::Internal)?;
            ids.push(r.id);
        }
        Ok(ids)
    }

    /// The expired rules leave the baseline and a pending change's
    /// previous set too (saved).
    fn expire_elsewhere(&mut self, now: u64) -> Result<(), ChangeError> {
        if !self.baseline.take_expired(now).is_empty() {
            self.store
                .save_baseline(&self.baseline)
                .map_err(ChangeError::Internal)?;
        }
        if let Some(p) = &mut self.pending
            && !p.previous.take_expired(now).is_empty()
        {
            self.store
                .save_pending(Some(p))
                .map_err(ChangeError::Internal)?;
        }
        Ok(())
    }
}
