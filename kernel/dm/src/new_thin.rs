//! Creating a thin device and its device in one change, as `thin create`, `snap
//! create` and imports do.

use alloc::format;
use alloc::string::String;

use crate::Error;
use crate::activate::Format;
use crate::mapper::DeviceMapper;

impl DeviceMapper {
    /// Allocates the next free device id of `pool`, creates it there (`create_thin`,
    /// or `create_snap` of `snapshot_of`) and activates it as `name` with `sectors`
    /// (over the external `origin`, if given). If activation fails, the new thin
    /// device is deleted again, so nothing changes. Returns the id and the table.
    pub fn new_thin(
        &mut self,
        name: &str,
        pool: &str,
        sectors: u64,
        origin: Option<&str>,
        snapshot_of: Option<u64>,
    ) -> Result<(u64, String), Error> {
        self.check_new_name(name)?;
        let engine = self.pool(pool)?;
        let dev = engine
            .devices()
            .map_err(|error| format!("{pool}: {}", error.text))?
            .into_iter()
            .max()
            .map_or(0, |highest| highest + 1);
        let message = match snapshot_of {
            Some(origin_id) => format!("create_snap {dev} {origin_id}"),
            None => format!("create_thin {dev}"),
        };
        self.message(pool, &message)?;
        self.record_new_thin(pool, dev, snapshot_of);
        let table = match origin {
            Some(origin) => format!("0 {sectors} thin {pool} {dev} {origin}"),
            None => format!("0 {sectors} thin {pool} {dev}"),
        };
        if let Err(error) = self.create(name, false, &table, Format::IfBlank) {
            let _ = self.message(pool, &format!("delete {dev}"));
            return Err(error);
        }
        Ok((dev, table))
    }
}
