//! The listener's CPU cost per update, on one core, without a server: decoding (and, with
//! signing on, checking) envelopes as the pipe packs them, against a plain
//! `serde_json::Value` parse of each update, which is what the raw baseline's listener does.
//! Numeric keys without flags are read by the reader of the crate's exact form; string keys
//! and flags by serde (the "string keys and flags" case).
//!
//! `cargo bench --bench decode` prints updates per second for each case (median of 7 runs).
//! The server delivers at most about 900,000 notifications per second on the benchmark
//! machine (`updatepipe bench`, raw batched 100/tx), so a decoder well above that keeps up
//! on one core.

use std::hint::black_box;
use std::time::{Instant, SystemTime};

use updatepipe::{ChannelName, Envelope, Origin, Secret, SeqSet, Signer, Update};

const UPDATES: u64 = 200_000;
const RUNS: usize = 7;

fn main() {
    let updates: Vec<Update> = (0..UPDATES)
        .map(|i| {
            let uid = u32::try_from(i % 100_000).expect("small") + 1;
            Update::new_message(i % 256, SeqSet::single(uid).expect("a valid uid"))
        })
        .collect();
    let origin = Origin::random();
    let mut seq = 0;
    let packed = Envelope::pack_v1(
        &origin,
        4242,
        || {
            seq += 1;
            seq
        },
        &updates,
    )
    .expect("updates fit");
    // Updates the exact-form reader leaves to serde: string keys, flags.
    let named: Vec<Update> = (0..UPDATES)
        .map(|i| {
            let uid = u32::try_from(i % 100_000).expect("small") + 1;
            let flags = vec![updatepipe::Flag::new("\\Seen").expect("a flag")];
            Update::flags_changed(format!("INBOX/{}", i % 256), uid, flags).expect("an update")
        })
        .collect();
    let named_packed = Envelope::pack_v1(&origin, 4242, || 1, &named).expect("updates fit");
    let single: Vec<String> = updates
        .iter()
        .enumerate()
        .map(|(i, u)| {
            Envelope::encode_v1(&origin, 4242, i as u64 + 1, std::slice::from_ref(u))
                .expect("one update fits")
        })
        .collect();
    let raw: Vec<String> = updates.iter().map(Update::to_json).collect();
    let signer = Signer::new(
        vec![Secret::new(vec![7u8; 32]).expect("long enough")],
        ChannelName::default(),
    )
    .expect("a secret");
    let now = SystemTime::now();
    // A signed envelope carries about 100 bytes more: a few updates fewer per envelope.
    let per_signed = (UPDATES as usize / packed.len()) - 5;
    let signed_packed: Vec<String> = updates
        .chunks(per_signed)
        .enumerate()
        .map(|(i, chunk)| {
            let body = Envelope::encode_v1(&origin, 4242, i as u64 + 1, chunk).expect("fits");
            signer.seal(&body, now).expect("an unsigned envelope")
        })
        .collect();
    let signed_single: Vec<String> = single
        .iter()
        .map(|p| signer.seal(p, now).expect("an unsigned envelope"))
        .collect();

    println!(
        "{UPDATES} updates: {} packed envelopes (about {} updates each), or one per envelope\n",
        packed.len(),
        UPDATES / packed.len() as u64
    );
    println!("{:<46} {:>14}", "case (one core)", "updates/s");
    report("raw: serde_json::Value per update", || {
        for payload in &raw {
            black_box(serde_json::from_str::<serde_json::Value>(payload).is_ok());
        }
    });
    report("pipe: decode, packed envelopes", || {
        for payload in &packed {
            black_box(Envelope::decode(payload).expect("valid").updates().len());
        }
    });
    report("pipe: decode, packed, string keys and flags", || {
        for payload in &named_packed {
            black_box(Envelope::decode(payload).expect("valid").updates().len());
        }
    });
    report("pipe: decode, one update per envelope", || {
        for payload in &single {
            black_box(Envelope::decode(payload).expect("valid").updates().len());
        }
    });
    report("signed: verify + decode, packed", || {
        for payload in &signed_packed {
            signer.verify(payload).expect("signed");
            black_box(Envelope::decode(payload).expect("valid").updates().len());
        }
    });
    report("signed: verify + decode, one per envelope", || {
        for payload in &signed_single {
            signer.verify(payload).expect("signed");
            black_box(Envelope::decode(payload).expect("valid").updates().len());
        }
    });
}

/// Runs `work` (one pass over all updates) `RUNS` times and prints the median rate.
fn report(name: &str, mut work: impl FnMut()) {
    work();
    let mut rates: Vec<f64> = (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            work();
            UPDATES as f64 / started.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    println!("{name:<46} {:>14.0}", rates[RUNS / 2]);
}
