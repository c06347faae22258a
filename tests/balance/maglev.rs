//! ConsistentHash (Maglev).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use fulcrum::balance::{
    Algorithm, Balancer, DEFAULT_TABLE_SIZE, EndpointSpec, HealthFlag, Request, hash_key, table_size,
};

use crate::common::*;

fn owner(b: &mut Balancer, hash: u64) -> SocketAddr {
    pick_addr(b, &Request { hash: Some(hash), ..Default::default() }).expect("an endpoint")
}

/// The owner of every table slot (a hash of `s` lands on slot `s`).
fn table(b: &mut Balancer) -> Vec<SocketAddr> {
    (0..DEFAULT_TABLE_SIZE).map(|s| owner(b, s)).collect()
}

fn max_over_mean(counts: &BTreeMap<SocketAddr, usize>, n: usize) -> f64 {
    let total: usize = counts.values().sum();
    *counts.values().max().unwrap() as f64 / (total as f64 / n as f64)
}

#[test]
fn the_same_key_maps_to_the_same_endpoint_whatever_the_spec_order() {
    let (_, mut a) = simple(Algorithm::ConsistentHash, specs(50));
    let mut reversed = specs(50);
    reversed.reverse();
    let (_, mut b) = simple(Algorithm::ConsistentHash, reversed);
    for key in 0..10_000u32 {
        let h = hash_key(format!("user-{key}").as_bytes());
        let first = owner(&mut a, h);
        assert_eq!(owner(&mut a, h), first, "stable across picks");
        assert_eq!(owner(&mut b, h), first, "stable across builds");
    }
}

#[test]
fn load_imbalance_is_at_most_5_percent_at_100_endpoints() {
    let (_, mut b) = simple(Algorithm::ConsistentHash, specs(100));
    let mut slots = BTreeMap::new();
    for a in table(&mut b) {
        *slots.entry(a).or_insert(0) += 1;
    }
    let slot_ratio = max_over_mean(&slots, 100);
    let mut keys = BTreeMap::new();
    for k in 0..1_000_000u32 {
        *keys.entry(owner(&mut b, hash_key(&k.to_le_bytes()))).or_insert(0) += 1;
    }
    let key_ratio = max_over_mean(&keys, 100);
    eprintln!("max/mean at N=100: table slots {slot_ratio:.4}, 1M hashed keys {key_ratio:.4}");
    assert!(slot_ratio <= 1.05 && key_ratio <= 1.05);
}

#[test]
fn removing_one_of_n_moves_its_keys_and_at_most_2_percent_of_the_others() {
    for n in [5, 10, 50, 100] {
        let (_, mut before) = simple(Algorithm::ConsistentHash, specs(n));
        let removed = addr(n / 2);
        let remaining: Vec<EndpointSpec> = specs(n).into_iter().filter(|s| s.addr != removed).collect();
        let (_, mut after) = simple(Algorithm::ConsistentHash, remaining);
        let (t0, t1) = (table(&mut before), table(&mut after));
        let mut others = 0usize;
        let mut others_moved = 0usize;
        for (a, b) in t0.iter().zip(&t1) {
            assert_ne!(*b, removed);
            if *a != removed {
                others += 1;
                others_moved += usize::from(a != b);
            }
        }
        let share = others_moved as f64 / others as f64;
        eprintln!("N={n}: removing one endpoint moved {:.3}% of the other endpoints' slots", share * 100.0);
        assert!(share <= 0.02, "N={n}: {share}");
    }
}

#[test]
fn an_unhealthy_endpoint_loses_its_keys_and_gets_them_back() {
    let (_, mut b) = simple(Algorithm::ConsistentHash, specs(10));
    let before = table(&mut b);
    let victim = b.set().members()[3].endpoint().clone();
    victim.set_flag(HealthFlag::ActiveCheckFailed, true);
    let during = table(&mut b);
    assert!(during.iter().all(|a| *a != victim.addr()));
    victim.set_flag(HealthFlag::ActiveCheckFailed, false);
    assert_eq!(table(&mut b), before);
}

#[test]
fn without_a_key_the_choice_is_random_but_always_valid() {
    let (_, mut b) = simple(Algorithm::ConsistentHash, specs(4));
    let counts = distribution(&mut b, 4000);
    assert_eq!(counts.len(), 4);
}

#[test]
fn tables_grow_to_100_slots_per_endpoint() {
    let n = 1000;
    let size = table_size(n, DEFAULT_TABLE_SIZE);
    assert!(size >= 100 * n as u64);
    let (_, mut b) = simple(Algorithm::ConsistentHash, specs(n));
    let mut slots = BTreeMap::new();
    for s in 0..size {
        *slots.entry(owner(&mut b, s)).or_insert(0) += 1;
    }
    assert_eq!(slots.len(), n);
    assert!(max_over_mean(&slots, n) <= 1.02, "{}", max_over_mean(&slots, n));
}
