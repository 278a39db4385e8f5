//! Pool messages, growing the data space, and status.

use super::*;

impl Core {
    pub fn message(&mut self, message: Message) -> Result<(), MessageError> {
        self.require_writable_metadata()?;
        if let Message::CreateSnap { origin, .. } = message {
            // Quiesce the origin: no new writes can arrive during this call; wait for
            // the ones in flight. Parts of writes waiting for space stay queued: they
            // are processed from scratch afterwards, see the blocks shared with the
            // snapshot, and so change the origin only.
            self.wait_until(|core| core.writes_settled(origin));
        }
        self.drain_preps();
        self.require_writable_metadata()?;
        if self.md_dirty {
            self.commit_now()?;
        }
        let applied = self.apply(message);
        // Snapshots change what is shared; deleted ids can come back; a failed
        // message may have rolled the transaction back.
        self.mappings.clear();
        applied?;
        self.md_dirty = true;
        self.commit_now()
    }

    pub fn require_writable_metadata(&self) -> Result<(), MessageError> {
        if self.mode.metadata_writable() {
            return Ok(());
        }
        Err(MessageError::new(
            Errno::Eopnotsupp,
            format!(
                "unable to service pool target messages in READ_ONLY or FAIL mode (pool is {})",
                self.mode.status_word()
            ),
        ))
    }

    pub(super) fn apply(&mut self, message: Message) -> Result<(), MessageError> {
        match message {
            Message::CreateThin { dev } => {
                let context =
                    format!("Creation of new thinly-provisioned device with id {dev} failed");
                self.md
                    .create_thin(dev)
                    .map_err(|e| self.message_failed(&e, &context))
            }
            Message::CreateSnap { dev, origin } => {
                let context = format!("Creation of new snapshot {dev} of device {origin} failed");
                self.md
                    .create_snap(dev, origin)
                    .map_err(|e| self.message_failed(&e, &context))
            }
            Message::Delete { dev } => self.delete(dev),
            Message::SetTransactionId { current, new } => {
                let context = format!("Failed to change transaction id from {current} to {new}");
                self.md
                    .set_transaction_id(current, new)
                    .map_err(|e| self.message_failed(&e, &context))
            }
            Message::ReserveMetadataSnap => {
                self.md
                    .reserve_metadata_snap()
                    .map_err(|e| self.message_failed(&e, "reserve_metadata_snap failed"))?;
                self.snap_held_since = Some(self.now_ns);
                self.snap_warned = false;
                Ok(())
            }
            Message::ReleaseMetadataSnap => {
                self.md.release_metadata_snap().map_err(|e| {
                    self.message_failed(&e, "release_metadata_snap failed (nothing to release)")
                })?;
                self.snap_held_since = None;
                Ok(())
            }
        }
    }

    /// Turns a metadata error of a message into its message error; a failure after
    /// changes started rolls them back (to the commit made just before).
    pub(super) fn message_failed(&mut self, error: &MdError, context: &str) -> MessageError {
        let refused = matches!(
            error,
            MdError::DeviceExists(_)
                | MdError::NoSuchDevice(_)
                | MdError::SnapshotHeld(_)
                | MdError::NoSnapshot
                | MdError::TransactionIdMismatch { .. }
                | MdError::BadDeviceId(_)
                | MdError::ReservedDeviceId(_)
                | MdError::TimeExhausted
                | MdError::MergeIntoItself(_)
        );
        if !refused {
            self.mappings.clear();
            self.uncommitted.clear();
            self.drop_discards_after_commit(EIO_METADATA);
            match self.md.abort() {
                Ok(()) if *error == MdError::NoMetadataSpace => self.after_commit(),
                _ => self.metadata_failed(error),
            }
        }
        md_error_to_message(error, context)
    }

    // ----------------------------------------------------------------------------
    // Size changes and status

    /// Grows the data space to `blocks` (never shrinks) and commits.
    pub fn grow_data(&mut self, blocks: u64) -> Result<(), MessageError> {
        let current = self.md.data_nr_blocks();
        if blocks < current {
            return Err(MessageError::new(
                Errno::Einval,
                format!("pool target ({blocks} blocks) too small: expected {current}"),
            ));
        }
        if blocks == current {
            return Ok(());
        }
        if self.md.needs_check() {
            return Err(MessageError::new(
                Errno::Einval,
                "unable to grow the data device until the metadata is repaired (needs_check)",
            ));
        }
        self.require_writable_metadata()?;
        self.drain_preps();
        self.md
            .resize_data(blocks)
            .map_err(|e| self.message_failed(&e, "growing the data space failed"))?;
        self.md_dirty = true;
        self.commit_now()?;
        if self.md.data_free_blocks() > self.config.low_water_mark {
            self.low_water_armed = true;
        }
        if self.mode == PoolMode::OutOfDataSpace && self.md.data_free_blocks() > 0 {
            self.leave_out_of_data_space("the pool was grown");
        }
        Ok(())
    }

    /// Puts `device` in place of the data device once the I/O in flight on it has
    /// finished, then grows the data space to `blocks`. The device must begin with
    /// the current one's sectors (a table reload that extends the data device).
    pub fn grow_data_onto(
        &mut self,
        device: alloc::boxed::Box<dyn BlockDevice>,
        blocks: u64,
    ) -> Result<(), MessageError> {
        let current = self.md.data_nr_blocks();
        if blocks < current {
            return Err(MessageError::new(
                Errno::Einval,
                format!("pool target ({blocks} blocks) too small: expected {current}"),
            ));
        }
        self.drain_all();
        self.data = Queue::new(device);
        self.grow_data(blocks)
    }

    /// Moves the metadata onto a larger `device` that begins with the current one's
    /// blocks, grows the metadata space map onto it and commits; a pool that was out
    /// of metadata space writes again. Returns the new number of metadata blocks and
    /// the warning for a device larger than the format can use.
    pub fn grow_metadata_onto(
        &mut self,
        device: alloc::boxed::Box<dyn BlockDevice>,
    ) -> Result<(u64, Option<String>), MessageError> {
        if self.md.needs_check()
            || !matches!(
                self.mode,
                PoolMode::Write | PoolMode::OutOfDataSpace | PoolMode::OutOfMetadataSpace
            )
        {
            return Err(MessageError::new(
                Errno::Einval,
                format!(
                    "unable to grow the metadata while the pool is {}",
                    if self.md.needs_check() {
                        "marked needs_check"
                    } else {
                        self.mode.status_word()
                    }
                ),
            ));
        }
        self.drain_preps();
        let (blocks, warning) = self
            .md
            .grow_onto(device)
            .map_err(|e| md_error_to_message(&e, "growing the metadata failed"))?;
        self.md_dirty = true;
        let leaving = self.mode == PoolMode::OutOfMetadataSpace && !self.metadata_exhausted();
        if leaving {
            self.set_mode(
                PoolMode::Write,
                String::from("the metadata device was grown"),
            );
        }
        self.commit_now()?;
        self.check_metadata_space();
        if leaving {
            self.after_commit();
        }
        let warning = warning.map(|warning| format!("{warning}"));
        if let Some(text) = &warning {
            self.push_event(PoolEvent::MetadataDeviceTooLarge(text.clone()));
        }
        Ok((blocks, warning))
    }

    pub fn status(&self) -> PoolStatus {
        let metadata_total = self.md.metadata_nr_blocks();
        let data_total = self.md.data_nr_blocks();
        let discard = if self.config.features.ignore_discard {
            DiscardMode::Ignore
        } else if self.passdown {
            DiscardMode::Passdown
        } else {
            DiscardMode::NoPassdown
        };
        PoolStatus {
            mode: self.mode,
            transaction_id: self.md.transaction_id(),
            metadata_used: metadata_total - self.md.metadata_free_blocks_reported(),
            metadata_total,
            data_used: data_total - self.md.data_free_blocks(),
            data_total,
            held_root: self.md.held_root(),
            discard,
            error_if_no_space: self.error_if_no_space,
            needs_check: self.md.needs_check(),
            metadata_low_watermark: self.metadata_low_watermark(),
        }
    }

    pub fn thin_status(&mut self, dev: u64) -> Result<ThinStatus, MessageError> {
        let context = format!("status of thin device {dev}");
        if self.mode == PoolMode::Fail {
            return Ok(ThinStatus {
                failed: true,
                mapped_sectors: 0,
                highest_mapped_sector: None,
            });
        }
        let mapped = self
            .md
            .mapped_blocks(dev)
            .map_err(|e| md_error_to_message(&e, &context))?;
        let highest = self
            .md
            .highest_mapped(dev)
            .map_err(|e| md_error_to_message(&e, &context))?;
        let bs = self.block_sectors;
        Ok(ThinStatus {
            failed: false,
            mapped_sectors: mapped * bs,
            highest_mapped_sector: highest.map(|h| (h + 1) * bs - 1),
        })
    }
}
