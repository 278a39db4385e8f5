//! Creating a pool on a large metadata device: the command follows the format of
//! the metadata with progress lines, or returns at once with `--background` while
//! `jobs` lists the format and the pool refuses work until it is done.

use crate::tests::{boot, error, lines, mem_disk, ok};

#[test]
fn pool_create_follows_the_format_of_large_metadata() {
    // 1152 MiB of metadata (19 bitmaps) and 102,000 MiB of data (100 bitmaps), sparse.
    let disks = alloc::vec![
        ("vda", mem_disk(1152, "disk", "meta")),
        ("vdb", mem_disk(102_000, "disk", "data")),
    ];
    let (mut console, _) = boot(&disks);
    let out = ok(&mut console, "pool create pool vda vdb");
    let printed = lines(&out);
    assert_eq!(printed[0], "pool: formatting new pool metadata on vda");
    assert_eq!(printed[1], "pool: 0 208896000 thin-pool vda vdb 128 0 0");
    assert!(
        printed[2].starts_with(
            "pool: format of metadata device vda: 21% (19 of 87 bitmaps), 19 bitmaps/s, "
        ),
        "{printed:?}"
    );
    assert_eq!(
        printed[printed.len() - 2..],
        [
            "event: pool: metadata formatted on vda; the pool is ready",
            "pool: metadata formatted, the pool is ready"
        ]
    );
    ok(&mut console, "thin create vol pool --size 1G");

    ok(&mut console, "remove vol");
    ok(&mut console, "remove pool");
    assert_eq!(
        ok(
            &mut console,
            "pool create again vda vdb --format --background"
        ),
        "again: formatting new pool metadata on vda\r\n\
         again: 0 208896000 thin-pool vda vdb 128 0 0\r\n\
         again: usable once its metadata is formatted (jobs shows it as again/format)\r\n"
    );
    let jobs = ok(&mut console, "jobs");
    assert!(
        jobs.starts_with("again/format  again: format of metadata device vda, "),
        "{jobs}"
    );
    assert_eq!(
        error(&mut console, "thin create vol again --size 1G"),
        "error: pool again is still formatting its metadata (jobs shows it as again/format); \
         try again when it is done"
    );
    let mut rounds = 0;
    while !ok(&mut console, "jobs").contains("no background jobs") {
        rounds += 1;
        assert!(rounds < 10, "the format never finished");
    }
    ok(&mut console, "thin create vol again --size 1G");
}
