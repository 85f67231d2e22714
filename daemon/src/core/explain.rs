//! `portcullis explain` through the core: the packet's frame is run through
//! the explain instance of the loaded programs (against the live maps, or
//! against a proposed rule set compiled into scratch maps), and the result
//! is named with the live image's slots and the deny sets' names. Nothing
//! is changed: no rule, counter, flow, event or audit record.

use portcullis_common::{EXPLAIN_UNSET, Reason, SLOT_INDEX_MASK};

use super::{ChangeError, Core, compile_with};
use crate::{
    compile::Slots,
    dataplane::{Program, Verdict},
    explain::{Decision, Direction, Explained, Request, why},
};

impl Core {
    /// What the data path decides for `req.packet`, and with `req.rules`
    /// what that rule set would decide instead.
    pub fn explain(&mut self, req: &Request) -> Result<Explained, ChangeError> {
        let probe = &req.packet;
        if let Some(name) = &probe.interface
            && !self.interfaces.contains_key(name)
        {
            return Err(ChangeError::Config(format!(
                "interface {name:?} is not protected (protected: {}): nothing of Portcullis decides its packets",
                self.interfaces
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let frame = probe.frame().map_err(ChangeError::Config)?;
        let program = match probe.direction {
            Direction::In => Program::Ingress,
            Direction::Out => Program::Egress,
        };
        let lockdown = self.effective()?;
        let slots = lockdown.map(|l| l.slots);
        let verdict = self
            .dataplane
            .explain(program, &frame, probe.interface.as_deref())
            .map_err(ChangeError::Internal)?;
        let mut live = self.decision(&verdict, slots.as_ref().unwrap_or(&self.image.slots));
        if verdict.result.generation != EXPLAIN_UNSET {
            live.generation = Some(self.generation);
        }
        let proposed = match &req.rules {
            None => None,
            Some(replacement) => {
                let next = replacement.clone().over(self.rules.head());
                next.validate()?;
                let image = compile_with(&next, &self.service, &self.limits)?;
                let ping = self.effective_ping(self.allow_ping);
                let verdict = self
                    .dataplane
                    .explain_proposed(program, &frame, &image, ping, probe.interface.as_deref())
                    .map_err(ChangeError::Internal)?;
                Some(self.decision(&verdict, &image.slots))
            }
        };
        Ok(Explained {
            packet: probe.describe(),
            interface: probe.interface.clone(),
            differs: proposed.as_ref().map(|p| !p.same_as(&live)),
            live,
            proposed,
        })
    }

    /// Names what a run reported: the reason, the slot's rule and the deny
    /// set.
    fn decision(&self, v: &Verdict, slots: &Slots) -> Decision {
        let r = &v.result;
        let reason = Reason::ALL.iter().copied().find(|x| *x as u32 == r.reason);
        let credited = (r.slot != EXPLAIN_UNSET)
            .then(|| slots.get((r.slot & SLOT_INDEX_MASK) as usize))
            .flatten()
            .map(|s| s.name.to_string());
        let deny_set = (r.deny_set != EXPLAIN_UNSET).then(|| {
            self.deny
                .sets()
                .iter()
                .find(|(_, s)| s.id == r.deny_set)
                .map_or_else(|| format!("#{}", r.deny_set), |(name, _)| name.clone())
        });
        let mut why = why(reason, credited.as_deref(), deny_set.as_deref());
        if r.audited != 0 {
            why = format!("{why}; passed anyway: audit (or open) mode");
        }
        Decision {
            passes: v.passes,
            reason: reason.map(|x| x.name().to_string()),
            audited: r.audited != 0,
            credited,
            deny_set,
            generation: None,
            why,
        }
    }
}
