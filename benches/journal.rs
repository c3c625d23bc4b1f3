//! What the journal's integrity costs per durable write.
//!
//! Every lifecycle step is one `put` and one `flush`. The journal's flush is
//! sled's flush plus the high-water mark: one fixed-size in-place write of
//! `podvisor-mark` and its data sync. The floor, measured in the same run on
//! the same disk, is the same insert and flush on a bare sled database. The
//! two are interleaved round by round, so the machine's drift touches both.
//!
//! `cargo bench --bench journal` (default 2,000 writes each);
//! `-- --writes N` for another count. Prints p50/p99 per durable write and
//! the journal's ratio to the floor.

mod common;

use common::arg;
use podvisor_state::{InstanceRecord, InstanceSpec, Journal, SledJournal};
use std::time::{Duration, Instant};

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i].as_secs_f64() * 1e6
}

fn main() {
    let writes = arg("--writes", 2_000);
    // Under target/, on the disk the tests use: not a tmpfs.
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("journal-bench");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("the bench directory");
    let journal = SledJournal::open(&base.join("journal")).expect("the journal");
    let floor = sled::Config::new()
        .path(base.join("floor"))
        .open()
        .expect("the bare sled database");
    let (mut with_mark, mut bare) = (Vec::new(), Vec::new());
    for round in 0..writes {
        // 64 sandboxes written in turn, each write a new value (its
        // creation time is the round): sled writes nothing for a value
        // that did not change, which would make the floor free.
        let i = round % 64;
        let record = &InstanceRecord::pending(
            &format!("{i:064x}"),
            &format!("web-{i}"),
            "shop",
            InstanceSpec::default(),
            round as u64 + 1,
        );
        let t = Instant::now();
        journal.put(record).expect("put");
        journal.flush().expect("flush");
        with_mark.push(t.elapsed());
        let bytes = record.encode();
        let t = Instant::now();
        floor
            .insert(record.sandbox_id.as_bytes(), bytes)
            .expect("insert");
        floor.flush().expect("flush");
        bare.push(t.elapsed());
    }
    let (j50, j99) = (
        percentile(&mut with_mark, 0.5),
        percentile(&mut with_mark, 0.99),
    );
    let (f50, f99) = (percentile(&mut bare, 0.5), percentile(&mut bare, 0.99));
    println!("durable writes: {writes} each, interleaved");
    println!("floor (bare sled insert + flush): p50 {f50:.0} µs, p99 {f99:.0} µs");
    println!("journal (put + flush + mark):     p50 {j50:.0} µs, p99 {j99:.0} µs");
    println!(
        "journal / floor: p50 {:.2}x, p99 {:.2}x",
        j50 / f50.max(1e-9),
        j99 / f99.max(1e-9)
    );
    let _ = std::fs::remove_dir_all(&base);
}
