//! Workspaces in memfd segments, exchanged by ranks that are threads here (a threads world is a
//! control plane too); across real processes in the workspace's `tests/tests/processes.rs`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use moe_core::host::{HostRank, HostWorldConfig, run_host_world};

use super::*;

#[test]
fn every_rank_maps_every_members_segment() {
    let group = [0, 1, 2];
    let results = run_host_world(HostWorldConfig::new(3), |rank| {
        let words = MemfdMemory.symmetric_alloc(&rank, &group, "test alloc", 64)?;
        let me = rank.rank();
        words[me].words()[63].store(100 + me as u32, Ordering::Release);
        rank.barrier(&group, "stored")?;
        let seen: Vec<u32> = words.iter().map(|w| w.words()[63].load(Ordering::Acquire)).collect();
        rank.barrier(&group, "read")?;
        Ok(seen)
    });
    for r in results {
        assert_eq!(r.unwrap(), vec![100, 101, 102]);
    }
}

#[test]
fn a_rank_over_shared_memory_allocates_symmetric_workspaces_and_flags_pass_between_them() {
    let group = [0, 1];
    let results = run_host_world(HostWorldConfig::new(2), |threads| {
        let rank = HostRank::over_shared(Arc::new(threads), Arc::new(MemfdMemory));
        let mem = rank.symmetric_alloc(&group, "workspace", 32)?;
        assert_eq!(mem.bytes_per_rank(), 128);
        let (me, peer) = (mem.me(), 1 - mem.me());
        mem.store_bytes(peer, 8, &[me as u8 + 1; 12]);
        mem.release_flag(peer, 4 * me, 1);
        mem.acquire_flag("test", 4 * peer, peer, 1)?;
        let mut got = [0u8; 12];
        mem.load_bytes(me, 8, &mut got);
        Ok(got)
    });
    assert_eq!(results[0].as_ref().unwrap(), &[2u8; 12]);
    assert_eq!(results[1].as_ref().unwrap(), &[1u8; 12]);
}

#[test]
fn a_rank_over_a_plane_without_shared_memory_is_refused_naming_the_way() {
    let results = run_host_world(HostWorldConfig::new(1), |threads| {
        let rank = HostRank::over(Arc::new(threads));
        rank.symmetric_alloc(&[0], "workspace", 4).map(|_| ())
    });
    let e = results[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("HostRank::over_shared") && e.contains("MemfdMemory"), "{e}");
}

fn record(boot_id: &str, name: &str, bytes: u64) -> Record {
    Record {
        host: Host {
            boot_id: boot_id.into(),
            name: name.into(),
        },
        bytes,
        socket: b"moe-shm/1/2/3".to_vec(),
    }
}

#[test]
fn records_round_trip_and_every_truncation_or_extension_is_refused() {
    let r = record("b00t", "node-a", 1 << 40);
    let bytes = r.encode();
    assert_eq!(Record::decode(&bytes), Some(r));
    for cut in 0..bytes.len() {
        assert_eq!(Record::decode(&bytes[..cut]), None, "truncated at {cut}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(Record::decode(&longer), None);
    let mut huge_len = bytes;
    huge_len[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(Record::decode(&huge_len), None);
}

#[test]
fn a_member_on_another_host_is_refused_naming_both_and_the_backend_that_crosses_hosts() {
    let here = record("boot-a", "node-a", 8);
    let there = record("boot-b", "node-b", 8);
    let e = check_records(&[here.encode(), there.encode()], &[0, 3], 0, &here.host, 8, "ws").unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, MoeError::Unsupported(_)), "{text}");
    assert!(
        text.contains("rank 0 (host node-a) and rank 3 (host node-b)") && text.contains("allgather-rs"),
        "{text}"
    );
}

#[test]
fn a_member_offering_another_size_or_sending_garbage_is_named() {
    let here = record("boot-a", "node-a", 8);
    let e = check_records(
        &[here.encode(), record("boot-a", "node-a", 9).encode()],
        &[0, 1],
        0,
        &here.host,
        8,
        "ws",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("rank 1 offers a workspace of 9 bytes where this rank's has 8"),
        "{e}"
    );
    let e = check_records(&[here.encode(), b"junk".to_vec()], &[0, 1], 0, &here.host, 8, "ws")
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 1 sent a malformed workspace record (4 bytes)"), "{e}");
}
