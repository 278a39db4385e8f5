//! COW devices written by Linux read back as Linux says, a thinbox-written COW is
//! byte for byte what Linux wrote for the same operations, and a merge interrupted
//! by a power cut under Linux finishes here with the right content.

mod common;

use blockdev::MemDisk;
use common::{PAGE, PERSISTENT, contents, fixture_dir, fixture_disk, open, page, sha256, view};
use snapshot::{MergeStep, Snapshot, write_origin};

const PAGES: usize = 512;
const SECTORS: u64 = (PAGES * PAGE / 512) as u64;

/// Linux's recorded status line or sha256 called `key` in `linux-status.txt`.
fn linux(key: &str) -> String {
    let text = std::fs::read_to_string(fixture_dir().join("linux-status.txt")).unwrap();
    text.lines()
        .find_map(|line| {
            line.split_once(&format!("{key}: "))
                .map(|(_, v)| v.to_string())
        })
        .unwrap_or_else(|| panic!("{key} not recorded"))
}

fn expected(tag_of: impl Fn(usize) -> char) -> Vec<u8> {
    (0..PAGES).flat_map(|i| page(tag_of(i), i)).collect()
}

fn origin_view() -> Vec<u8> {
    expected(|i| if i < 300 { 'W' } else { 'O' })
}

fn snapshot_view() -> Vec<u8> {
    expected(|i| if (400..450).contains(&i) { 'S' } else { 'O' })
}

#[test]
fn clean_cow_reads_back_as_linux_wrote_it() {
    let origin = fixture_disk("clean-origin");
    let cow = fixture_disk("clean-cow");
    assert_eq!(contents(&origin), origin_view());
    assert_eq!(sha256(&origin_view()), linux("sha256 origin view (clean)"));
    for table_chunk in [8, 0, 32] {
        let (mut snap, notes) = Snapshot::open(
            Box::new(origin.handle()),
            Box::new(cow.handle()),
            PERSISTENT,
            table_chunk,
            SECTORS,
        )
        .unwrap();
        assert_eq!(snap.chunk_sectors(), 8, "the header's chunk size wins");
        let overridden = table_chunk != 0 && table_chunk != 8;
        assert_eq!(notes.len(), usize::from(overridden), "{notes:?}");
        assert_eq!(snap.status(), linux("clean STATUS-A"));
        assert_eq!(snap.exception_count(), 350);
        let seen = view(&mut snap, SECTORS, false);
        assert_eq!(seen, snapshot_view());
        assert_eq!(sha256(&seen), linux("sha256 snapshot view / merged origin"));
    }
}

#[test]
fn fresh_store_status_and_bytes_match_linux() {
    let origin = MemDisk::new(SECTORS);
    let cow = MemDisk::new(SECTORS);
    let snap = open(&origin, &cow, PERSISTENT, 8);
    assert_eq!(snap.status(), linux("clean STATUS-EMPTY"));
    let mut header = [0u8; 16];
    cow.read_at(0, &mut header);
    assert_eq!(&header, b"SnAp\x01\0\0\0\x01\0\0\0\x08\0\0\0");
}

/// Linux's operations replayed on blank disks give Linux's COW, byte for byte.
#[test]
fn replaying_linuxs_writes_gives_linuxs_cow() {
    let origin = MemDisk::new(SECTORS);
    for i in 0..PAGES {
        origin.write_at((i * PAGE) as u64, &page('O', i));
    }
    let cow = MemDisk::new(SECTORS);
    let mut snap = open(&origin, &cow, PERSISTENT, 8);
    let mut writer = origin.handle();
    for k in 0..300 {
        let p = (7 * k) % 300;
        let sector = (p * PAGE / 512) as u64;
        write_origin(&mut writer, &mut [&mut snap], sector, &page('W', p), false).unwrap();
    }
    for p in 400..450 {
        snap.write((p * PAGE / 512) as u64, &page('S', p)).unwrap();
    }
    assert_eq!(snap.status(), linux("clean STATUS-A"));
    assert_eq!(contents(&origin), contents(&fixture_disk("clean-origin")));
    assert_eq!(contents(&cow), contents(&fixture_disk("clean-cow")));
}

/// Runs a merge to the end, checking the origin's view after every step.
fn merge_to_end(snap: &mut Snapshot, want: &[u8], budget: u64) -> usize {
    let mut steps = 0;
    loop {
        match snap.merge_step(&mut [], budget) {
            MergeStep::Working => steps += 1,
            MergeStep::Finished => return steps,
            MergeStep::Failed => panic!("merge failed: {:?}", snap.take_events()),
        }
        if steps % 16 == 0 {
            assert_eq!(view(snap, SECTORS, true), want, "view after step {steps}");
        }
    }
}

#[test]
fn merge_cut_by_a_power_loss_under_linux_finishes_here() {
    let origin = fixture_disk("merging-origin");
    let cow = fixture_disk("merging-cow");
    let mut snap = open(&origin, &cow, PERSISTENT, 8);
    // What the cut left: 187 records in area 0, area 1 emptied.
    assert_eq!(snap.exception_count(), 187);
    assert_eq!(snap.status(), format!("{}/4096 16", (1 + 187 + 1) * 8));
    snap.start_merge().unwrap();
    assert_eq!(view(&mut snap, SECTORS, true), snapshot_view());
    merge_to_end(&mut snap, &snapshot_view(), 8);
    assert_eq!(snap.status(), linux("resumed STATUS-MERGED"));
    assert_eq!(snap.take_events(), ["merge finished"]);
    let merged = contents(&origin);
    assert_eq!(merged, snapshot_view());
    assert_eq!(
        sha256(&merged),
        linux("sha256 snapshot view / merged origin")
    );
    let mut area = vec![0u8; PAGE];
    cow.read_at(PAGE as u64, &mut area);
    assert!(area.iter().all(|&b| b == 0), "every record cleared");
}

#[test]
fn clean_cow_merges_in_linuxs_order() {
    let origin = fixture_disk("clean-origin");
    let cow = fixture_disk("clean-cow");
    let mut snap = open(&origin, &cow, PERSISTENT, 8);
    snap.start_merge().unwrap();
    // The first run is the tail of area 1: the 50 snapshot writes, consecutive in
    // both old and new chunks, which start at record 44 of area 1.
    assert_eq!(snap.merge_step(&mut [], 1 << 20), MergeStep::Working);
    assert_eq!(snap.exception_count(), 300);
    assert_eq!(snap.status(), format!("{}/4096 24", (258 + 44 + 1) * 8));
    let steps = merge_to_end(&mut snap, &snapshot_view(), 1 << 20);
    assert_eq!(steps, 300, "every origin copy-out is a run of its own");
    assert_eq!(snap.status(), linux("resumed STATUS-MERGED"));
    assert_eq!(contents(&origin), snapshot_view());
}
