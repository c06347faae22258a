//! The source's state machine and the slice-to-endpoint rules, exactly.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fulcrum::discovery::Target;
use fulcrum::discovery::kubernetes::{ConfigChange, VANISHED_GRACE, View, config_from, targets};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;

use super::*;

/// A fixed instant for snapshots; the hold of vanished endpoints counts from it.
fn t0() -> Instant {
    use std::sync::OnceLock;
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn w() -> Watched {
    watched(addr("127.0.0.1:8000"), addr("127.0.0.1:8001"))
}

/// A view with the round-robin configuration and one listed slice `a` of two ready endpoints.
fn listed_two() -> View {
    let mut v = View::new(w());
    v.on_config(Event::Apply(config_map(ROUND_ROBIN)));
    v.on_slice(Event::Init);
    v.on_slice(Event::InitApply(slice("a", "web-backends", 8080, &[ready("10.0.0.1"), ready("10.0.0.2")])));
    v.on_slice(Event::InitDone);
    v
}

fn summary(ts: &[Target]) -> Vec<(String, String, bool)> {
    ts.iter().map(|t| (t.spec.addr.to_string(), t.spec.track.to_string(), t.draining)).collect()
}

fn row(a: &str, track: &str, draining: bool) -> (String, String, bool) {
    (a.to_owned(), track.to_owned(), draining)
}

#[test]
fn endpoint_conditions_decide_new_traffic_and_draining() {
    let s = slice(
        "web-backends-a",
        "web-backends",
        8080,
        &[
            ("10.0.0.1", None, None, None),
            ready("10.0.0.2"),
            unready("10.0.0.3"),
            terminating("10.0.0.4"),
            // Terminating and no longer serving: out.
            ("10.0.0.5", Some(false), Some(false), Some(true)),
            // Ready but terminating (older controllers): drain it.
            ("10.0.0.6", Some(true), None, Some(true)),
        ],
    );
    assert_eq!(
        summary(&targets([&s], &w(), false)),
        vec![
            row("10.0.0.1:8080", "stable", false),
            row("10.0.0.2:8080", "stable", false),
            row("10.0.0.4:8080", "stable", true),
            row("10.0.0.6:8080", "stable", true),
        ]
    );
}

#[test]
fn an_address_in_two_slices_counts_once_at_its_most_usable() {
    let a = slice("web-backends-a", "web-backends", 8080, &[terminating("10.0.0.1"), ready("10.0.0.2")]);
    let b = slice("web-backends-b", "web-backends", 8080, &[ready("10.0.0.1"), unready("10.0.0.2")]);
    let expected = vec![row("10.0.0.1:8080", "stable", false), row("10.0.0.2:8080", "stable", false)];
    assert_eq!(summary(&targets([&a, &b], &w(), false)), expected);
    assert_eq!(summary(&targets([&b, &a], &w(), false)), expected, "order of slices does not matter");
}

#[test]
fn ports_come_from_the_named_port_and_unusable_slices_are_skipped() {
    let mut two_ports: EndpointSlice = slice("web-backends-a", "web-backends", 8080, &[ready("10.0.0.1")]);
    two_ports.ports = Some(vec![
        serde_json::from_value(json!({"name": "metrics", "port": 9100})).expect("port"),
        serde_json::from_value(json!({"name": "app", "port": 8443})).expect("port"),
    ]);
    let mut ambiguous = slice("web-backends-b", "web-backends", 8080, &[ready("10.0.0.2")]);
    ambiguous.ports = Some(vec![
        serde_json::from_value(json!({"name": "x", "port": 1})).expect("port"),
        serde_json::from_value(json!({"name": "y", "port": 2})).expect("port"),
    ]);
    let mut fqdn = slice("web-backends-c", "web-backends", 8080, &[ready("db.example.com")]);
    fqdn.address_type = "FQDN".into();
    let mut udp = slice("web-backends-d", "web-backends", 8080, &[ready("10.0.0.4")]);
    udp.ports =
        Some(vec![serde_json::from_value(json!({"name": "app", "port": 53, "protocol": "UDP"})).expect("port")]);
    let unnamed = slice("web-backends-e", "web-backends", 8080, &[ready("not-an-ip")]);
    let other_service = slice("db-a", "db", 5432, &[ready("10.0.0.9")]);
    let got = targets([&two_ports, &ambiguous, &fqdn, &udp, &unnamed, &other_service], &w(), false);
    assert_eq!(summary(&got), vec![row("10.0.0.1:8443", "stable", false)]);
}

#[test]
fn the_track_comes_from_the_service_and_canary_counts_only_with_a_split() {
    let stable = slice("web-backends-a", "web-backends", 8080, &[ready("10.0.0.1")]);
    let canary = slice("web-canary-backends-a", "web-canary-backends", 8080, &[ready("10.0.1.1")]);
    assert_eq!(summary(&targets([&stable, &canary], &w(), false)), vec![row("10.0.0.1:8080", "stable", false)]);
    assert_eq!(
        summary(&targets([&stable, &canary], &w(), true)),
        vec![row("10.0.0.1:8080", "stable", false), row("10.0.1.1:8080", "canary", false)]
    );
}

#[test]
fn no_snapshot_until_the_configuration_and_the_slice_list_are_both_known() {
    let mut v = View::new(w());
    assert!(v.snapshot(t0()).is_none());
    v.on_slice(Event::Init);
    v.on_slice(Event::InitApply(slice("web-backends-a", "web-backends", 8080, &[ready("10.0.0.1")])));
    assert!(v.snapshot(t0()).is_none());
    v.on_slice(Event::InitDone);
    assert!(v.snapshot(t0()).is_none(), "no configuration yet");
    assert_eq!(v.on_config(Event::Apply(config_map(ROUND_ROBIN))), ConfigChange::Applied);
    let s = v.snapshot(t0()).expect("snapshot");
    assert_eq!(summary(&s.targets), vec![row("10.0.0.1:8080", "stable", false)]);
    assert_eq!(s.config.listen, addr("127.0.0.1:8000"), "the command line fixes the listener");
    assert_eq!(s.config.admin, Some(addr("127.0.0.1:8001")));
    assert_eq!(v.on_config(Event::Apply(config_map(ROUND_ROBIN))), ConfigChange::None, "same content: no change");
}

#[test]
fn a_relist_replaces_the_endpoints_only_once_complete() {
    let mut v = listed_two();
    let before = v.snapshot(t0()).expect("snapshot");
    // The watch restarts (an API server restart, a 410 Gone): until the new
    // list is complete, the old endpoints stay.
    v.on_slice(Event::Init);
    assert_eq!(v.snapshot(t0()).as_ref(), Some(&before));
    v.on_slice(Event::InitApply(slice("b", "web-backends", 8080, &[ready("10.0.0.2")])));
    assert_eq!(v.snapshot(t0()).as_ref(), Some(&before));
    v.on_slice(Event::InitDone);
    // 10.0.0.1 vanished while serving: held for the grace period, then gone.
    assert_eq!(v.snapshot(t0()).as_ref(), Some(&before));
    let later = t0() + VANISHED_GRACE;
    assert_eq!(summary(&v.snapshot(later).expect("snapshot").targets), vec![row("10.0.0.2:8080", "stable", false)]);
    // Watch events after the list.
    v.on_slice(Event::Apply(slice("c", "web-backends", 8080, &[ready("10.0.0.3")])));
    v.on_slice(Event::Delete(slice("b", "web-backends", 8080, &[])));
    let much_later = later + VANISHED_GRACE;
    v.snapshot(later);
    assert_eq!(
        summary(&v.snapshot(much_later).expect("snapshot").targets),
        vec![row("10.0.0.3:8080", "stable", false)]
    );
}

#[test]
fn a_missing_deleted_or_invalid_config_map_keeps_the_last_good_configuration() {
    let mut v = View::new(w());
    v.on_slice(Event::Init);
    v.on_slice(Event::InitDone);
    v.on_config(Event::Init);
    assert!(matches!(v.on_config(Event::InitDone), ConfigChange::Rejected(why) if why.contains("not found")));
    assert!(v.snapshot(t0()).is_none());
    assert_eq!(v.on_config(Event::Apply(config_map(ROUND_ROBIN))), ConfigChange::Applied);
    let good = v.snapshot(t0()).expect("snapshot");

    let bad = config_map("listen: 0.0.0.0:15080\nloadBalancing: {algorithm: Fastest}\n");
    match v.on_config(Event::Apply(bad)) {
        ConfigChange::Rejected(why) => {
            assert!(why.contains("loadBalancing.algorithm"), "names the field: {why}");
            assert!(why.contains("default/web-proxy"), "names the ConfigMap: {why}");
        }
        other => panic!("accepted an invalid configuration: {other:?}"),
    }
    assert!(matches!(v.on_config(Event::Delete(config_map(ROUND_ROBIN))), ConfigChange::Rejected(_)));
    let mut no_key = config_map("");
    no_key.data = None;
    assert!(matches!(v.on_config(Event::Apply(no_key)), ConfigChange::Rejected(why) if why.contains("proxy.yaml")));
    // A relist without the ConfigMap does not lose it either.
    v.on_config(Event::Init);
    assert!(matches!(v.on_config(Event::InitDone), ConfigChange::Rejected(_)));
    assert_eq!(v.snapshot(t0()), Some(good));
}

#[test]
fn the_config_map_listener_addresses_are_replaced_by_the_command_line() {
    let cm = config_map("listen: 0.0.0.0:1\nadmin: 0.0.0.0:2\n");
    let config = config_from(&cm, &w()).expect("valid");
    assert_eq!(config.listen, addr("127.0.0.1:8000"));
    assert_eq!(config.admin, Some(addr("127.0.0.1:8001")));
}

#[test]
fn the_slice_selector_names_both_backends_services_and_the_front_one() {
    assert_eq!(w().slice_selector(), "kubernetes.io/service-name in (web-backends,web-canary-backends,web)");
}

#[test]
fn a_serving_endpoint_that_vanishes_from_every_slice_is_held_for_the_grace_period() {
    let mut v = listed_two();
    let both = vec![row("10.0.0.1:8080", "stable", false), row("10.0.0.2:8080", "stable", false)];
    assert_eq!(summary(&v.snapshot(t0()).expect("snapshot").targets), both);
    assert_eq!(v.next_expiry(), None);

    // The slice is deleted before its replacement is written.
    v.on_slice(Event::Delete(slice("a", "web-backends", 8080, &[])));
    assert_eq!(summary(&v.snapshot(t0()).expect("snapshot").targets), both, "held, not dropped");
    assert_eq!(v.next_expiry(), Some(t0() + VANISHED_GRACE));
    v.on_slice(Event::Apply(slice("b", "web-backends", 8080, &[ready("10.0.0.1")])));
    let later = t0() + Duration::from_millis(300);
    assert_eq!(summary(&v.snapshot(later).expect("snapshot").targets), both, "10.0.0.2 still within its grace");
    assert_eq!(v.next_expiry(), Some(t0() + VANISHED_GRACE), "the grace counts from the first absence");
    let after = t0() + VANISHED_GRACE;
    assert_eq!(summary(&v.snapshot(after).expect("snapshot").targets), vec![row("10.0.0.1:8080", "stable", false)]);
    assert_eq!(v.next_expiry(), None);
}

#[test]
fn not_ready_and_terminating_endpoints_are_never_held() {
    let mut v = listed_two();
    v.snapshot(t0());
    // Not ready: out at once, although the slice still lists it.
    v.on_slice(Event::Apply(slice("a", "web-backends", 8080, &[ready("10.0.0.1"), unready("10.0.0.2")])));
    assert_eq!(summary(&v.snapshot(t0()).expect("snapshot").targets), vec![row("10.0.0.1:8080", "stable", false)]);
    // Terminating, then gone: no hold after draining.
    v.on_slice(Event::Apply(slice("a", "web-backends", 8080, &[terminating("10.0.0.1")])));
    assert_eq!(summary(&v.snapshot(t0()).expect("snapshot").targets), vec![row("10.0.0.1:8080", "stable", true)]);
    v.on_slice(Event::Apply(slice("a", "web-backends", 8080, &[])));
    assert!(v.snapshot(t0()).expect("snapshot").targets.is_empty());
    assert_eq!(v.next_expiry(), None);
}

#[test]
fn zones_come_from_the_slices_and_a_sidecar_learns_its_own_from_its_pod() {
    // nextest runs each test in its own process: the environment is this test's.
    // SAFETY: no other thread of this process reads or writes the environment meanwhile.
    unsafe {
        std::env::set_var("POD_IP", "10.0.0.2");
        std::env::remove_var("FULCRUM_ZONE");
    }
    let mut s =
        slice("web-backends-a", "web-backends", 8080, &[ready("10.0.0.1"), ready("10.0.0.2"), ready("10.0.0.3")]);
    for (e, zone) in s.endpoints.iter_mut().zip(["z1", "z2", "z2"]) {
        e.zone = Some(zone.into());
    }
    let mut v = View::new(w());
    let yaml = "listen: 0.0.0.0:15080\nadmin: 0.0.0.0:15090\nloadBalancing: {algorithm: RoundRobin, zoneAware: {}}\n";
    v.on_config(Event::Apply(config_map(yaml)));
    // The Service in front of the proxies: two ready proxies in z1, one in
    // z2, one not ready (not counted), one without a zone (not counted).
    let mut front = slice(
        "web-a",
        "web",
        15080,
        &[ready("10.0.1.1"), ready("10.0.1.2"), ready("10.0.1.3"), unready("10.0.1.4"), ready("10.0.1.5")],
    );
    for (e, zone) in front.endpoints.iter_mut().zip(["z1", "z1", "z2", "z2"]) {
        e.zone = Some(zone.into());
    }
    v.on_slice(Event::Init);
    v.on_slice(Event::InitApply(s));
    v.on_slice(Event::InitApply(front));
    v.on_slice(Event::InitDone);
    let snap = v.snapshot(t0()).expect("a snapshot");
    let zones: Vec<Option<String>> = snap.targets.iter().map(|t| t.spec.zone.as_deref().map(str::to_owned)).collect();
    assert_eq!(zones, [Some("z1".into()), Some("z2".into()), Some("z2".into())], "the proxies are no endpoints");
    assert_eq!(snap.config.load_balancing.zone_aware.as_ref().and_then(|z| z.zone.as_deref()), Some("z2"));
    let balancer = snap.config.balancer_config();
    assert_eq!(balancer.local_zone.as_deref(), Some("z2"));
    let proxies: Vec<(&str, u32)> = balancer.zone_proxies.iter().map(|(z, n)| (&**z, *n)).collect();
    assert_eq!(proxies, [("z1", 2), ("z2", 1)]);
}

#[test]
fn proxies_per_zone_in_the_configuration_win_over_the_front_service() {
    let mut front = slice("web-a", "web", 15080, &[ready("10.0.1.1")]);
    front.endpoints[0].zone = Some("z1".into());
    let mut v = View::new(w());
    let yaml = "listen: 0.0.0.0:15080\nadmin: 0.0.0.0:15090\nloadBalancing: {algorithm: RoundRobin, zoneAware: {zone: z1, proxies: {z1: 1, z2: 3}}}\n";
    v.on_config(Event::Apply(config_map(yaml)));
    v.on_slice(Event::Init);
    v.on_slice(Event::InitApply(front));
    v.on_slice(Event::InitDone);
    let snap = v.snapshot(t0()).expect("a snapshot");
    let z = snap.config.load_balancing.zone_aware.as_ref().expect("zone-aware");
    assert_eq!((z.zone.as_deref(), z.proxies.get("z2")), (Some("z1"), Some(&3)));
    assert!(snap.targets.is_empty());
}
