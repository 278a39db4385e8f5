//! Memory does not grow with the pool: millions of mappings through a 1 MiB cache
//! (dirty blocks are written before their commit to make room).

mod common;

use blockdev::MemDisk;
use common::*;

#[test]
fn millions_of_mappings_through_a_one_mib_cache() {
    let disk = MemDisk::new(128 << 11);
    let mut md = open(&disk, 256);
    let total = 1_500_000u64;
    md.resize_data(total).unwrap();
    md.create_thin(1).unwrap();
    for v in 0..total {
        let data = md.alloc_data_block().unwrap();
        assert_eq!(data, v, "a fresh pool hands out blocks in order");
        md.insert(1, v, data).unwrap();
        if v % 500_000 == 499_999 {
            md.commit().unwrap();
        }
    }
    md.commit().unwrap();
    let stats = md.cache_stats();
    assert!(
        stats.early_writes > 1000,
        "the cache had to write early: {stats:?}"
    );
    assert_eq!(md.data_free_blocks(), 0);
    assert_eq!(
        md.alloc_data_block(),
        Err(persistent_data::Error::NoDataSpace)
    );
    let mut md = open(&disk, 256);
    assert_eq!(md.mapped_blocks(1).unwrap(), total);
    assert_eq!(md.highest_mapped(1).unwrap(), Some(total - 1));
    for v in (0..total).step_by(997) {
        assert_eq!(md.lookup(1, v).unwrap().unwrap().data_block, v);
    }
    let runs = md.lookup_range(1, 0, total + 10, 10).unwrap();
    assert_eq!(
        runs,
        vec![
            persistent_data::Run::Mapped {
                begin: 0,
                len: total,
                data_begin: 0,
                shared: false
            },
            persistent_data::Run::Unmapped {
                begin: total,
                len: 10
            },
        ]
    );
    // Free half of it in one transaction and reuse it after the commit.
    let removed = md.remove_range(1, 0, total / 2).unwrap();
    assert_eq!(
        removed,
        vec![persistent_data::RemovedRun {
            begin: 0,
            data_begin: 0,
            len: total / 2
        }]
    );
    for b in 0..total / 2 {
        assert_eq!(md.dec_data_block(b).unwrap(), 0);
    }
    assert_eq!(
        md.alloc_data_block(),
        Err(persistent_data::Error::NoDataSpace),
        "blocks freed in this transaction are not reused before the commit"
    );
    md.commit().unwrap();
    assert_eq!(md.alloc_data_block().unwrap(), 0);
    let report = persistent_data::check::check(&mut md).unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
}
