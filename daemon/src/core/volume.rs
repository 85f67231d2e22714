//! Egress volume through the core: the data path's per-destination table
//! read into the ledger (`crate::volume`), idle entries deleted, alerts
//! handed to the caller (who logs them and tells `watch`).

use super::Core;
use crate::volume::{Alert, Destination, Ledger, Settings};

/// What `status` shows of egress volume.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct VolumeStatus {
    /// The destinations that sent the most since the daemon started.
    pub top: Vec<Destination>,
    /// Destinations counted.
    pub destinations: usize,
    /// Traffic that found the data path's table full (not counted per
    /// destination): packets and bytes.
    pub overflow_packets: u64,
    pub overflow_bytes: u64,
}

impl Core {
    /// Starts counting with `settings` (replaces the totals so far);
    /// `None`: not counting.
    pub fn volume_configure(&mut self, settings: Option<Settings>) {
        self.volume = Ledger::new(settings.unwrap_or_default());
        self.volume_on = settings.is_some();
    }

    /// Whether egress volume is counted.
    pub fn volume_on(&self) -> bool {
        self.volume_on
    }

    /// Reads the data path's table into the ledger; returns the alerts and
    /// the overflow since the previous reading.
    pub fn volume_read(&mut self) -> anyhow::Result<(Vec<Alert>, portcullis_common::Counter)> {
        if !self.volume_on {
            return Ok(Default::default());
        }
        let (rows, overflow) = self.dataplane.egress_volume()?;
        let reading = self.volume.read(crate::model::unix_now(), &rows, overflow);
        if !reading.idle.is_empty() {
            self.dataplane.egress_volume_forget(&reading.idle)?;
            self.volume.forgotten(&reading.idle);
        }
        Ok((reading.alerts, reading.overflow))
    }

    /// The top destinations (as many as configured) and the overflow.
    pub fn volume_status(&self) -> VolumeStatus {
        let overflow = self.volume.overflow();
        VolumeStatus {
            top: self.volume.top(self.volume.settings().top),
            destinations: self.volume.destinations(),
            overflow_packets: overflow.packets,
            overflow_bytes: overflow.bytes,
        }
    }
}
