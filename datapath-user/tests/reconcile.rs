//! The reconciler against the in-memory fake and against real maps: the
//! same sequences must leave both in the same state.

mod common;

use std::net::Ipv4Addr;

use datapath_user::{
    k8s::{
        Ipv6Serving, IssueKind, NodeContext, ObjectKey, ServiceTranslation, Typed, manifest,
        translate_service,
    },
    maps::{FakeMaps, LbMaps, MapDump},
    model::{BackendAddress, Frontend, Protocol},
    reconcile::Reconciler,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// A Service `name` at `ip` with one TCP port 80 → 8080 and a slice with
/// `endpoints` ready pods 10.244.<n>.1 ….
fn service_yaml(name: &str, ip: &str, ports: &[u16], endpoints: usize) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  clusterIP: {ip}\n  ports:\n"
    );
    for port in ports {
        text += &format!("  - {{name: p{port}, port: {port}, targetPort: 8080}}\n");
    }
    text += &format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: test\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n"
    );
    for port in ports {
        text += &format!("- {{name: p{port}, port: 8080}}\n");
    }
    text += "endpoints:\n";
    for i in 0..endpoints {
        text += &format!("- addresses: [10.244.{}.{}]\n", i / 250, i % 250 + 1);
    }
    text
}

fn translation(yaml: &str) -> (ObjectKey, ServiceTranslation) {
    translation_on(yaml, &NodeContext::default())
}

fn translation_on(yaml: &str, node: &NodeContext) -> (ObjectKey, ServiceTranslation) {
    let parsed = manifest::parse(yaml, "test");
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let mut service: Option<Service> = None;
    let mut slices: Vec<EndpointSlice> = Vec::new();
    for object in parsed.objects {
        match object {
            Typed::Service(s) => service = Some(*s),
            Typed::EndpointSlice(s) => slices.push(*s),
        }
    }
    let service = service.unwrap();
    (
        ObjectKey::of_service(&service),
        translate_service(&service, &slices, node),
    )
}

fn gone(name: &str) -> (ObjectKey, ServiceTranslation) {
    (ObjectKey::new("test", name), ServiceTranslation::default())
}

fn apply<M: LbMaps>(reconciler: &mut Reconciler<M>, (key, t): &(ObjectKey, ServiceTranslation)) {
    let outcome = reconciler.update_service(key, t);
    assert!(outcome.issues.is_empty(), "{:?}", outcome.issues);
}

/// Frontends with their backends' addresses (ids differ between runs).
fn view(dump: &MapDump) -> Vec<String> {
    let mut out = family_view(&dump.frontends, &dump.backends);
    out.extend(family_view(&dump.frontends6, &dump.backends6));
    out.sort();
    out
}

/// One family's frontends, each with its backends in slot order.
fn family_view<A: Copy + Into<std::net::IpAddr> + Eq + std::hash::Hash>(
    frontends: &[datapath_user::maps::DumpedFrontend<A>],
    backends: &[(u32, BackendAddress<A>)],
) -> Vec<String>
where
    BackendAddress<A>: std::fmt::Display,
{
    let by_id: std::collections::HashMap<_, _> = backends.iter().copied().collect();
    frontends
        .iter()
        .map(|f| {
            let backends: Vec<String> = f
                .slots
                .iter()
                .map(|id| by_id[&id.unwrap()].to_string())
                .collect();
            format!("{} -> {}", f.frontend, backends.join(" "))
        })
        .collect()
}

/// create → scale up → scale down → delete, checking the maps each step.
fn lifecycle<M: LbMaps>(maps: M) {
    let mut reconciler = Reconciler::adopt(maps).unwrap();
    apply(
        &mut reconciler,
        &translation(&service_yaml("web", "10.96.1.1", &[80], 2)),
    );
    apply(
        &mut reconciler,
        &translation(&service_yaml("dns", "10.96.1.2", &[53, 54], 1)),
    );
    let dump = reconciler.maps().dump().unwrap();
    assert_eq!(
        view(&dump),
        [
            "10.96.1.1:80/TCP -> 10.244.0.1:8080/TCP 10.244.0.2:8080/TCP",
            "10.96.1.2:53/TCP -> 10.244.0.1:8080/TCP",
            "10.96.1.2:54/TCP -> 10.244.0.1:8080/TCP",
        ]
    );
    // One backend entry per address, shared by the frontends using it.
    assert_eq!(dump.backends.len(), 2);
    assert_eq!(reconciler.ids_in_use(), (2, 3));

    apply(
        &mut reconciler,
        &translation(&service_yaml("web", "10.96.1.1", &[80], 5)),
    );
    let dump = reconciler.maps().dump().unwrap();
    assert_eq!(dump.frontends.iter().map(|f| f.slots.len()).max(), Some(5));
    assert_eq!(dump.backends.len(), 5);

    apply(
        &mut reconciler,
        &translation(&service_yaml("web", "10.96.1.1", &[80], 1)),
    );
    let dump = reconciler.maps().dump().unwrap();
    assert_eq!(view(&dump)[0], "10.96.1.1:80/TCP -> 10.244.0.1:8080/TCP");
    assert_eq!(dump.backends.len(), 1, "scaled-down backends are deleted");

    // One port of dns dropped, then both services deleted.
    apply(
        &mut reconciler,
        &translation(&service_yaml("dns", "10.96.1.2", &[53], 1)),
    );
    assert_eq!(reconciler.maps().dump().unwrap().frontends.len(), 2);
    apply(&mut reconciler, &gone("web"));
    apply(&mut reconciler, &gone("dns"));
    let dump = reconciler.maps().dump().unwrap();
    assert_eq!(dump, MapDump::default(), "maps empty after delete");
    assert_eq!(reconciler.ids_in_use(), (0, 0), "ids released");
}

#[test]
fn lifecycle_on_fake_maps() {
    lifecycle(FakeMaps::with_capacity(64));
}

#[test]
fn lifecycle_on_real_maps() {
    let mut datapath = common::load_private();
    lifecycle(&mut datapath.maps);
}

#[test]
fn make_before_break_order() {
    let mut reconciler = Reconciler::adopt(FakeMaps::with_capacity(64)).unwrap();
    apply(
        &mut reconciler,
        &translation(&service_yaml("web", "10.96.1.1", &[80], 1)),
    );
    reconciler.maps_mut().log.clear();
    // Replace 10.244.0.1 by a new set: the new backends are written
    // before the frontend points at them; the old one is deleted after.
    let mut yaml = service_yaml("web", "10.96.1.1", &[80], 3);
    yaml = yaml.replace("- addresses: [10.244.0.1]\n", "");
    apply(&mut reconciler, &translation(&yaml));
    let log = &reconciler.maps().log;
    assert_eq!(
        log,
        &[
            "backend 2 = 10.244.0.2:8080",
            "backend 3 = 10.244.0.3:8080",
            "service 10.96.1.1:80/TCP",
            "remove backend 1",
        ]
    );
}

#[test]
fn unchanged_state_writes_nothing() {
    let mut reconciler = Reconciler::adopt(FakeMaps::with_capacity(64)).unwrap();
    let web = translation(&service_yaml("web", "10.96.1.1", &[80, 81], 3));
    apply(&mut reconciler, &web);
    let outcome = reconciler.update_service(&web.0, &web.1);
    assert_eq!(
        (outcome.frontends_written, outcome.frontends_removed),
        (0, 0)
    );
}

/// A second reconciler adopting the maps keeps every id, writes nothing
/// for an unchanged cluster, and prunes what the cluster no longer has.
fn adoption<M: LbMaps>(maps: M) {
    let web = translation(&service_yaml("web", "10.96.1.1", &[80], 3));
    let old = translation(&service_yaml("old", "10.96.1.9", &[80], 2));
    let mut first = Reconciler::adopt(maps).unwrap();
    apply(&mut first, &web);
    apply(&mut first, &old);
    let before = first.maps().dump().unwrap();
    let maps = first.into_maps();

    // "Restart": the cluster lost `old` while no agent ran.
    let mut second = Reconciler::adopt(maps).unwrap();
    let outcome = second.update_service(&web.0, &web.1);
    assert!(outcome.issues.is_empty());
    assert_eq!(
        outcome.frontends_written, 0,
        "adopted state is not rewritten"
    );
    let report = second.prune(false).unwrap();
    assert_eq!(report.frontends, 1);
    let after = second.maps().dump().unwrap();
    let kept: Vec<_> = before
        .frontends
        .iter()
        .filter(|f| f.frontend.address == Ipv4Addr::new(10, 96, 1, 1))
        .cloned()
        .collect();
    assert_eq!(after.frontends, kept, "same ids and slots after adoption");
    assert_eq!(
        after.backends.len(),
        3,
        "the pruned service's backends are gone"
    );
    assert_eq!(second.ids_in_use(), (3, 1));
}

/// `SERVICES` made afresh, `REVERSE_NAT` and `BACKENDS` kept (a layout
/// change of `SERVICES` alone): each frontend is programmed again under the
/// reverse-NAT id and backend ids its tracked flows name, unless two kept
/// entries share its address (its TCP and UDP frontends: which is which
/// is not in the entry), then it gets a new id.
#[test]
fn a_frontend_gets_back_the_reverse_nat_id_its_address_had() {
    let web = translation(&service_yaml("web", "10.96.1.1", &[80], 3));
    let api = translation(&service_yaml("api", "10.96.1.2", &[80], 2));
    let mut first = Reconciler::adopt(FakeMaps::with_capacity(64)).unwrap();
    apply(&mut first, &web);
    apply(&mut first, &api);
    let before = first.maps().dump().unwrap();
    let mut maps = first.into_maps();
    maps.v4.services.clear();
    let api_address = std::net::SocketAddrV4::new(Ipv4Addr::new(10, 96, 1, 2), 80);
    maps.v4
        .rev_nats
        .insert(40, (*api_address.ip(), api_address.port()));

    let mut second = Reconciler::adopt(maps).unwrap();
    apply(&mut second, &web);
    apply(&mut second, &api);
    second.prune(false).unwrap();
    let after = second.maps().dump().unwrap();
    let id_of = |dump: &MapDump, address: Ipv4Addr| {
        dump.frontends
            .iter()
            .find(|f| f.frontend.address == address)
            .map(|f| (f.rev_nat_id, f.slots.clone()))
            .unwrap()
    };
    let web_ip = Ipv4Addr::new(10, 96, 1, 1);
    assert_eq!(
        id_of(&after, web_ip),
        id_of(&before, web_ip),
        "web: same ids"
    );
    let (api_before, _) = id_of(&before, *api_address.ip());
    let (api_after, _) = id_of(&after, *api_address.ip());
    assert!(
        ![api_before, 40].contains(&api_after),
        "api: two kept entries at its address, a new id ({api_after})"
    );
    assert_eq!(
        after.rev_nats.len(),
        2,
        "the ambiguous entries no frontend took are pruned: {:?}",
        after.rev_nats
    );
}

#[test]
fn adoption_on_fake_maps() {
    adoption(FakeMaps::with_capacity(64));
}

#[test]
fn adoption_on_real_maps() {
    let mut datapath = common::load_private();
    adoption(&mut datapath.maps);
}

#[test]
fn a_bad_service_keeps_its_old_state_and_blocks_nothing() {
    let mut datapath = common::load_private();
    let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
    let big = translation(&service_yaml("big", "10.96.1.3", &[80], 2));
    apply(&mut reconciler, &big);
    // 1100 endpoints: over the 1024-per-service limit. This node's subset
    // of 1024 is served, and the issue says so.
    let too_big = translation(&service_yaml("big", "10.96.1.3", &[80], 1100));
    let outcome = reconciler.update_service(&too_big.0, &too_big.1);
    assert_eq!(outcome.issues.len(), 1);
    let issue = &outcome.issues[0];
    assert_eq!(issue.kind, IssueKind::Limit);
    assert_eq!(issue.object, "Service test/big");
    assert!(
        issue
            .reason
            .contains("1100 backends exceed the limit of 1024"),
        "{}",
        issue.reason
    );
    let dump = reconciler.maps().dump().unwrap();
    assert_eq!(dump.frontends[0].slots.len(), 1024);

    // An edit that makes the only port invalid: what was served stays.
    let small = translation(&service_yaml("small", "10.96.1.4", &[80], 1));
    apply(&mut reconciler, &small);
    let broken = translation(
        &service_yaml("small", "10.96.1.4", &[80], 1)
            .replace("port: 80,", "port: 80, protocol: HTTP,"),
    );
    let outcome = reconciler.update_service(&broken.0, &broken.1);
    assert!(
        outcome.issues.is_empty(),
        "translate reported it: {:?}",
        broken.1.issues
    );
    assert_eq!(broken.1.issues[0].kind, IssueKind::Invalid);
    let dump = reconciler.maps().dump().unwrap();
    assert!(
        view(&dump).contains(&"10.96.1.4:80/TCP -> 10.244.0.1:8080/TCP".to_owned()),
        "{:?}",
        view(&dump)
    );
    // Once valid again without that port, it goes.
    apply(&mut reconciler, &gone("small"));
    assert_eq!(reconciler.maps().dump().unwrap().frontends.len(), 1);
}

#[test]
fn a_released_frontend_goes_to_the_service_waiting_for_it() {
    let mut reconciler = Reconciler::adopt(FakeMaps::with_capacity(64)).unwrap();
    let a = translation(&service_yaml("a", "10.96.1.5", &[80], 1));
    let b = translation(&service_yaml("b", "10.96.1.5", &[80], 2));
    apply(&mut reconciler, &a);
    let outcome = reconciler.update_service(&b.0, &b.1);
    assert_eq!(outcome.issues[0].kind, IssueKind::Conflict);
    assert!(
        outcome.issues[0]
            .reason
            .contains("already served for Service test/a")
    );
    let outcome = reconciler.update_service(&a.0, &ServiceTranslation::default());
    assert_eq!(outcome.retry, [ObjectKey::new("test", "b")]);
    apply(&mut reconciler, &b);
    let frontend = Frontend {
        address: Ipv4Addr::new(10, 96, 1, 5),
        port: 80,
        protocol: Protocol::Tcp,
    };
    assert_eq!(reconciler.maps().v4.services[&frontend].1.len(), 2);
}

#[test]
fn prune_repairs_the_service_filter_on_real_maps() {
    let mut datapath = common::load_private();
    // A count left behind by an interrupted update.
    datapath.maps.service_filter.set(7, 3, 0).unwrap();
    let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
    apply(
        &mut reconciler,
        &translation(&service_yaml("web", "10.96.1.1", &[80], 1)),
    );
    let report = reconciler.prune(false).unwrap();
    assert_eq!(report.filter_buckets, 1);
    let total: u32 = datapath
        .maps
        .service_filter
        .iter()
        .map(|v| v.unwrap())
        .sum();
    assert_eq!(total, 1, "one frontend, counted once");
}

/// The same through bpffs, as an agent restart sees it: the maps are
/// pinned by one loader, written, released; a second process-like
/// opening of the pins adopts them and the lifecycle ends empty.
#[test]
fn adoption_and_lifecycle_through_pinned_maps() {
    common::require_root("pinned maps");
    // Removed also when an assertion or the load fails.
    let pins = common::PinDir::new();
    let pin_dir = pins.path();
    let options = pins.load_options();
    let web = translation(&service_yaml("web", "10.96.1.1", &[80], 3));
    let before = {
        let mut datapath = datapath_user::Datapath::load(&options).unwrap();
        let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
        apply(&mut reconciler, &web);
        reconciler.maps().dump().unwrap()
    };
    let maps = datapath_user::DatapathMaps::open_pinned(&pin_dir).unwrap();
    let mut reconciler = Reconciler::adopt(maps).unwrap();
    assert_eq!(
        reconciler.maps().dump().unwrap(),
        before,
        "the pins kept everything"
    );
    let outcome = reconciler.update_service(&web.0, &web.1);
    assert_eq!(outcome.frontends_written, 0, "adopted, not rewritten");
    apply(&mut reconciler, &gone("web"));
    assert_eq!(reconciler.maps().dump().unwrap(), MapDump::default());
    assert_eq!(reconciler.ids_in_use(), (0, 0));
}

/// Pins made by another version or with another size: the agent
/// (`PinPolicy::Own`) replaces exactly the maps that differ and keeps the
/// others' contents; anyone else adopts another size and refuses another
/// layout with an error naming the map.
#[test]
fn pinned_maps_made_differently_are_replaced_by_the_owner_only() {
    use aya::maps::{MapData, MapInfo};
    use datapath_common::maps::{
        BACKEND_ADDRS6_MAP, BACKENDS_MAP, CONNTRACK_TCP_MAP, CONNTRACK_UDP_MAP, REVERSE_NAT_MAP,
        SERVICES_MAP, SHARED_MAPS_ABI, SLOTS_MAP, SOCK_REVERSE_NAT_MAP, layout_version,
    };
    use datapath_user::{LoadOptions, loader::MapSizes, map_pins::PinPolicy};
    common::require_root("pinned maps");
    // Removed also when an assertion or the load fails.
    let pins = common::PinDir::new();
    let pin_dir = pins.path();
    let max_entries = |map: &str| MapInfo::from_pin(pin_dir.join(map)).unwrap().max_entries();
    let with = |flows: u32, pin_policy: PinPolicy| LoadOptions {
        pin_dir: Some(pin_dir.clone()),
        sizes: MapSizes {
            conntrack_tcp_flows: flows,
            ..MapSizes::default()
        },
        pin_policy,
        ..LoadOptions::default()
    };
    let web = translation(&service_yaml("web", "10.96.1.1", &[80], 3));
    let programmed = {
        let mut datapath = datapath_user::Datapath::load(&with(1000, PinPolicy::Own)).unwrap();
        assert!(
            datapath.made_the_service_maps(),
            "nothing was pinned: nothing to adopt"
        );
        let mut reconciler = Reconciler::new_on_empty(&mut datapath.maps);
        apply(&mut reconciler, &web);
        reconciler.maps().dump().unwrap()
    };
    assert_eq!(max_entries(CONNTRACK_TCP_MAP), 2000);

    // Another size: the CNI plugin adopts the agent's choice.
    drop(datapath_user::Datapath::load(&with(3000, PinPolicy::Adopt)).unwrap());
    assert_eq!(max_entries(CONNTRACK_TCP_MAP), 2000);
    // The agent started with another --conntrack-max gets it.
    let datapath = datapath_user::Datapath::load(&with(3000, PinPolicy::Own)).unwrap();
    assert_eq!(max_entries(CONNTRACK_TCP_MAP), 6000);
    assert!(
        !datapath.made_the_service_maps(),
        "the service maps were pinned: they must be adopted"
    );
    assert_eq!(
        datapath.maps.dump().unwrap(),
        programmed,
        "the maps that did not differ kept their contents"
    );
    drop(datapath);

    // Another layout: a map of other key and value sizes pinned where
    // CONNTRACK_UDP belongs (as an older version's would be).
    std::fs::remove_file(pin_dir.join(CONNTRACK_UDP_MAP)).unwrap();
    MapData::from_pin(pin_dir.join(SOCK_REVERSE_NAT_MAP))
        .unwrap()
        .pin(pin_dir.join(CONNTRACK_UDP_MAP))
        .unwrap();
    let refused = datapath_user::Datapath::load(&with(3000, PinPolicy::Adopt))
        .err()
        .expect("another layout is refused")
        .to_string();
    assert!(
        refused.contains(CONNTRACK_UDP_MAP) && refused.contains("value size"),
        "{refused}"
    );
    let datapath = datapath_user::Datapath::load(&with(3000, PinPolicy::Own)).unwrap();
    let udp = MapInfo::from_pin(pin_dir.join(CONNTRACK_UDP_MAP)).unwrap();
    assert_eq!(
        udp.value_size() as usize,
        size_of::<datapath_common::maps::CtEntry>()
    );
    assert_eq!(datapath.maps.dump().unwrap(), programmed);
    drop(datapath);

    // Each map's layout version is marked beside the pins. A build whose
    // SERVICES layout differs (its marker says v2) gets that map afresh;
    // every other map, conntrack among them, is kept as it is.
    use datapath_user::map_pins::LAYOUTS_DIR;
    let layouts = pin_dir.join(LAYOUTS_DIR);
    let ours = format!("{SERVICES_MAP}-v{}", layout_version(SERVICES_MAP).unwrap());
    assert!(
        layouts.join(&ours).is_dir(),
        "the pins carry their versions"
    );
    let map_id = |map: &str| MapInfo::from_pin(pin_dir.join(map)).unwrap().id();
    let ids = |maps: &[&str]| maps.iter().map(|m| map_id(m)).collect::<Vec<_>>();
    let kept = [
        CONNTRACK_TCP_MAP,
        CONNTRACK_UDP_MAP,
        REVERSE_NAT_MAP,
        BACKENDS_MAP,
    ];
    let (kept_ids, services_id) = (ids(&kept), map_id(SERVICES_MAP));
    let shared = |v: u32| pin_dir.join(format!("maps-abi-v{v}"));
    assert!(
        !shared(SHARED_MAPS_ABI).exists(),
        "no shared marker: SERVICES is past v3"
    );
    std::fs::remove_dir(layouts.join(&ours)).unwrap();
    std::fs::create_dir(layouts.join(format!("{SERVICES_MAP}-v2"))).unwrap();
    let refused = datapath_user::Datapath::load(&with(3000, PinPolicy::Adopt))
        .err()
        .expect("another layout version is refused")
        .to_string();
    assert!(
        refused.contains(SERVICES_MAP) && refused.contains("layout v2 pinned"),
        "{refused}"
    );
    let mut datapath = datapath_user::Datapath::load(&with(3000, PinPolicy::Own)).unwrap();
    assert_ne!(map_id(SERVICES_MAP), services_id, "SERVICES made afresh");
    assert_eq!(ids(&kept), kept_ids, "the other maps kept");
    // The agent programs the service again under the reverse-NAT id and
    // backend ids its tracked flows name: the same maps as before.
    let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
    apply(&mut reconciler, &web);
    reconciler.prune(false).unwrap();
    assert_eq!(reconciler.maps().dump().unwrap(), programmed, "ids kept");
    drop(reconciler);
    drop(datapath);
    assert!(layouts.join(&ours).is_dir() && !layouts.join(format!("{SERVICES_MAP}-v2")).exists());

    // Pins of the builds before per-map versions carry one shared marker,
    // v3, when SERVICES had another layout: an upgrade replaces SERVICES
    // alone and programs the service again under the ids its flows name.
    std::fs::remove_dir_all(&layouts).unwrap();
    std::fs::create_dir(shared(SHARED_MAPS_ABI)).unwrap();
    let (kept_ids, services_id) = (ids(&kept), map_id(SERVICES_MAP));
    let mut datapath = datapath_user::Datapath::load(&with(3000, PinPolicy::Own)).unwrap();
    assert_ne!(map_id(SERVICES_MAP), services_id, "SERVICES made afresh");
    assert_eq!(
        ids(&kept),
        kept_ids,
        "the maps of v3 kept, conntrack among them"
    );
    let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
    apply(&mut reconciler, &web);
    reconciler.prune(false).unwrap();
    assert_eq!(reconciler.maps().dump().unwrap(), programmed, "ids kept");
    drop(reconciler);
    drop(datapath);
    assert!(layouts.join(&ours).is_dir(), "per-map markers written");
    assert!(!shared(SHARED_MAPS_ABI).exists(), "and the shared one gone");
    // ... and at another (v2) nothing of them can be read.
    std::fs::remove_dir_all(&layouts).unwrap();
    std::fs::create_dir(shared(2)).unwrap();
    let refused = datapath_user::Datapath::load(&with(3000, PinPolicy::Adopt))
        .err()
        .expect("another layout version is refused")
        .to_string();
    assert!(refused.contains("layout v2 pinned"), "{refused}");
    let datapath = datapath_user::Datapath::load(&with(3000, PinPolicy::Own)).unwrap();
    assert_eq!(
        datapath.maps.dump().unwrap(),
        MapDump::default(),
        "every map made afresh"
    );
    assert!(!shared(SHARED_MAPS_ABI).exists() && !shared(2).exists());
    drop(datapath);

    // Another --backends-max: BACKENDS is made anew for its size, with
    // its entries carried under the same ids, so conntrack (whose flows
    // name those ids) is kept; the slots and frontends are made anew with
    // it (the programs still attached keep reading the old set, which the
    // new agent must not rewrite), and the service is programmed again
    // exactly as before.
    // IPv6 backends are not carried (their addresses are in
    // BACKEND_ADDRS6, made anew with BACKENDS): the IPv6 service is
    // written again.
    let mut options = with(3000, PinPolicy::Own);
    options.sizes.ipv6 = true;
    let v6 = translation(&ipv6_service_yaml(&[1, 2]));
    let programmed = {
        let mut datapath = datapath_user::Datapath::load(&options).unwrap();
        let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
        apply(&mut reconciler, &web);
        apply(&mut reconciler, &v6);
        reconciler.maps().dump().unwrap()
    };
    assert_eq!(programmed.backends6.len(), 2);
    let addrs6_id = map_id(BACKEND_ADDRS6_MAP);
    let followers = [SERVICES_MAP, SLOTS_MAP];
    let (ct_ids, backends_id, reverse_nat_id, follower_ids) = (
        ids(&[CONNTRACK_TCP_MAP, CONNTRACK_UDP_MAP]),
        map_id(BACKENDS_MAP),
        map_id(REVERSE_NAT_MAP),
        ids(&followers),
    );
    options.sizes.backends = 5000;
    let mut datapath = datapath_user::Datapath::load(&options).unwrap();
    assert_ne!(map_id(BACKENDS_MAP), backends_id, "BACKENDS made anew");
    assert_eq!(max_entries(BACKENDS_MAP), 5000);
    assert_eq!(
        ids(&[CONNTRACK_TCP_MAP, CONNTRACK_UDP_MAP]),
        ct_ids,
        "conntrack kept: the ids its flows name are carried"
    );
    assert!(
        ids(&followers)
            .iter()
            .zip(&follower_ids)
            .all(|(a, b)| a != b),
        "SERVICES and SLOTS made anew with BACKENDS"
    );
    assert!(!pin_dir.join(format!("{BACKENDS_MAP}-carried-v3")).exists());
    assert!(
        !datapath.made_the_service_maps(),
        "carried entries are adopted"
    );
    assert_eq!(
        datapath.maps.dump().unwrap().backends,
        programmed.backends,
        "carried before any sync"
    );
    assert_ne!(
        map_id(BACKEND_ADDRS6_MAP),
        addrs6_id,
        "BACKEND_ADDRS6 made anew with BACKENDS"
    );
    assert!(
        datapath.maps.dump().unwrap().backends6.is_empty(),
        "IPv6 entries are not carried without their addresses"
    );
    let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
    apply(&mut reconciler, &web);
    apply(&mut reconciler, &v6);
    reconciler.prune(false).unwrap();
    let again = reconciler.maps().dump().unwrap();
    assert_eq!(
        (&again.frontends, &again.backends, &again.rev_nats),
        (
            &programmed.frontends,
            &programmed.backends,
            &programmed.rev_nats
        ),
        "backends carried under the same ids, the frontend under its reverse-NAT id"
    );
    let addresses = |dump: &MapDump| -> Vec<_> { dump.backends6.iter().map(|(_, b)| *b).collect() };
    assert_eq!(addresses(&again), addresses(&programmed));
    assert_eq!(again.rev_nats6, programmed.rev_nats6);
    drop(reconciler);
    drop(datapath);
    // A BACKENDS of another layout cannot be carried: conntrack goes too.
    std::fs::rename(
        layouts.join(format!("{BACKENDS_MAP}-v3")),
        layouts.join(format!("{BACKENDS_MAP}-v2")),
    )
    .unwrap();
    drop(datapath_user::Datapath::load(&options).unwrap());
    let now = ids(&[CONNTRACK_TCP_MAP, CONNTRACK_UDP_MAP]);
    assert!(
        now.iter().zip(&ct_ids).all(|(a, b)| a != b),
        "conntrack made afresh with BACKENDS"
    );
    assert_eq!(map_id(REVERSE_NAT_MAP), reverse_nat_id, "the others kept");

    // A SERVICES made afresh (another --frontends-max) takes SLOTS with
    // it: a kept SLOTS would look free to the new agent while the programs
    // still running read it through the old SERVICES.
    let slots_id = map_id(SLOTS_MAP);
    options.sizes.services = 4000;
    drop(datapath_user::Datapath::load(&options).unwrap());
    assert_ne!(
        map_id(SLOTS_MAP),
        slots_id,
        "SLOTS made afresh with SERVICES"
    );
    assert_eq!(map_id(REVERSE_NAT_MAP), reverse_nat_id, "the others kept");
}

/// Every translate fixture, service by service through the reconciler,
/// leaves the maps holding exactly what `translate()` says; deleting the
/// services one by one leaves them empty with every id released.
fn fixtures_through<M: LbMaps>(maps: M) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/k8s");
    let mut fixtures: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    fixtures.sort();
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    for path in fixtures {
        let parsed = manifest::parse(&std::fs::read_to_string(&path).unwrap(), "fixture");
        for object in parsed.objects {
            match object {
                Typed::Service(s) => services.push(*s),
                Typed::EndpointSlice(s) => slices.push(*s),
            }
        }
    }
    services.sort_by_key(ObjectKey::of_service);
    let expected = datapath_user::k8s::translate(&services, &slices, &NodeContext::default());
    let line = |frontend: String, protocol, backends: Vec<String>| {
        let backends: Vec<String> = backends.iter().map(|b| format!("{b}/{protocol}")).collect();
        format!("{frontend} -> {}", backends.join(" "))
    };
    let mut want: Vec<String> = (expected.frontends.values())
        .map(|(_, d)| {
            let backends = d.backends.iter().map(ToString::to_string).collect();
            line(d.frontend.to_string(), d.frontend.protocol, backends)
        })
        .chain(expected.frontends6.values().map(|(_, d)| {
            let backends = d.backends.iter().map(ToString::to_string).collect();
            line(d.frontend.to_string(), d.frontend.protocol, backends)
        }))
        .collect();
    want.sort();

    let mut reconciler = Reconciler::adopt(maps).unwrap();
    for service in &services {
        let key = ObjectKey::of_service(service);
        let translation = translate_service(service, &slices, &NodeContext::default());
        // Conflicts are expected (conflict.yaml); nothing else is.
        let outcome = reconciler.update_service(&key, &translation);
        assert!(
            outcome.issues.iter().all(|i| i.kind == IssueKind::Conflict),
            "{:?}",
            outcome.issues
        );
    }
    let got: Vec<String> = view(&reconciler.maps().dump().unwrap())
        .into_iter()
        .map(|line| line.trim_end().to_owned())
        .collect();
    let want: Vec<String> = want.into_iter().map(|l| l.trim_end().to_owned()).collect();
    assert_eq!(got, want);
    for service in &services {
        apply(
            &mut reconciler,
            &(
                ObjectKey::of_service(service),
                ServiceTranslation::default(),
            ),
        );
    }
    assert_eq!(reconciler.maps().dump().unwrap(), MapDump::default());
    assert_eq!(reconciler.ids_in_use(), (0, 0));
}

#[test]
fn fixtures_on_fake_maps() {
    fixtures_through(FakeMaps::with_capacity(256));
}

#[test]
fn fixtures_on_real_maps() {
    let mut datapath = common::load_private();
    fixtures_through(&mut datapath.maps);
}

#[test]
fn a_write_failing_midway_frees_nothing_the_maps_may_still_name() {
    let mut reconciler = Reconciler::adopt(FakeMaps::with_capacity(64)).unwrap();
    apply(
        &mut reconciler,
        &translation(&service_yaml("web", "10.96.1.1", &[80], 1)),
    );
    let before = reconciler.maps().v4.services.clone();
    // Scale to 3 while the map "fills up" after the backends are written.
    let scaled = translation(
        &service_yaml("web", "10.96.1.1", &[80], 3).replace("- addresses: [10.244.0.1]\n", ""),
    );
    reconciler.maps_mut().fail_next_write = true;
    let outcome = reconciler.update_service(&scaled.0, &scaled.1);
    assert_eq!(outcome.issues[0].kind, IssueKind::Datapath);
    assert_eq!(
        reconciler.maps().v4.services,
        before,
        "the frontend still names the old backend"
    );
    let old_id = before.values().next().unwrap().1[0];
    assert!(
        reconciler.maps().v4.backends.contains_key(&old_id),
        "old backend kept"
    );
    assert_eq!(
        reconciler.ids_in_use().0,
        3,
        "old and new backend ids all held"
    );

    // The same update again (the agent retries): written, old freed.
    let outcome = reconciler.update_service(&scaled.0, &scaled.1);
    assert!(outcome.issues.is_empty(), "{:?}", outcome.issues);
    assert_eq!(outcome.frontends_written, 1);
    assert!(!reconciler.maps().v4.backends.contains_key(&old_id));
    assert_eq!(reconciler.ids_in_use().0, 2);
}

/// A Service `name` at `ip` (port 80 → 8080) whose one slice lists
/// `endpoints` as (address, ready, terminating).
fn service_with_conditions(name: &str, ip: &str, endpoints: &[(&str, bool, bool)]) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: test\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
    );
    for (address, ready, terminating) in endpoints {
        text += &format!(
            "- addresses: [{address}]\n  conditions: {{ready: {ready}, serving: {ready}, terminating: {terminating}}}\n"
        );
    }
    text
}

/// The id of the `BACKENDS` entry holding `address` (port 8080), if any.
fn backend_id(dump: &MapDump, address: &str) -> Option<u32> {
    let address: Ipv4Addr = address.parse().unwrap();
    dump.backends
        .iter()
        .find(|(_, b)| b.address == address && b.port == 8080)
        .map(|(id, _)| *id)
}

/// An endpoint that turns not-ready or terminating loses its slot (no new
/// flow) but keeps its `BACKENDS` entry under the same id (conntrack pins
/// flows to ids), also across an agent restart; only when it leaves the
/// slice is the entry deleted.
fn draining<M: LbMaps>(maps: M) {
    let mut reconciler = Reconciler::adopt(maps).unwrap();
    let both = [("10.244.0.1", true, false), ("10.244.0.2", true, false)];
    apply(
        &mut reconciler,
        &translation(&service_with_conditions("web", "10.96.2.1", &both)),
    );
    let id = backend_id(&reconciler.maps().dump().unwrap(), "10.244.0.2").unwrap();

    for (ready, terminating) in [(false, true), (false, false)] {
        let one_draining = [
            ("10.244.0.1", true, false),
            ("10.244.0.2", ready, terminating),
        ];
        apply(
            &mut reconciler,
            &translation(&service_with_conditions("web", "10.96.2.1", &one_draining)),
        );
        let dump = reconciler.maps().dump().unwrap();
        assert_eq!(view(&dump), ["10.96.2.1:80/TCP -> 10.244.0.1:8080/TCP"]);
        assert_eq!(backend_id(&dump, "10.244.0.2"), Some(id), "still draining");
    }

    // A restart: the new agent adopts the draining entry by its address
    // and prune keeps it.
    let maps = reconciler.into_maps();
    let mut reconciler = Reconciler::adopt(maps).unwrap();
    let one_draining = [("10.244.0.1", true, false), ("10.244.0.2", false, true)];
    apply(
        &mut reconciler,
        &translation(&service_with_conditions("web", "10.96.2.1", &one_draining)),
    );
    reconciler.prune(false).unwrap();
    assert_eq!(
        backend_id(&reconciler.maps().dump().unwrap(), "10.244.0.2"),
        Some(id),
        "a restart keeps the draining entry and its id"
    );

    // Every endpoint draining: no slot (new flows refused), entries kept.
    let none_ready = [("10.244.0.1", false, false), ("10.244.0.2", false, true)];
    apply(
        &mut reconciler,
        &translation(&service_with_conditions("web", "10.96.2.1", &none_ready)),
    );
    let dump = reconciler.maps().dump().unwrap();
    assert_eq!(view(&dump), ["10.96.2.1:80/TCP -> "]);
    assert_eq!(dump.backends.len(), 2);

    // Gone from the slice: the entry goes, its flows re-balance.
    apply(
        &mut reconciler,
        &translation(&service_with_conditions("web", "10.96.2.1", &both[..1])),
    );
    let dump = reconciler.maps().dump().unwrap();
    assert_eq!(backend_id(&dump, "10.244.0.2"), None);
    assert_eq!(dump.backends.len(), 1);
    apply(&mut reconciler, &gone("web"));
    assert_eq!(reconciler.maps().dump().unwrap(), MapDump::default());
    assert_eq!(reconciler.ids_in_use(), (0, 0), "ids released");
}

#[test]
fn draining_on_fake_maps() {
    draining(FakeMaps::with_capacity(64));
}

#[test]
fn draining_on_real_maps() {
    let mut datapath = common::load_private();
    draining(&mut datapath.maps);
}

/// Over 1024 endpoints, each node serves its own 1024 (so the nodes
/// together reach every endpoint), the same one on every sync, and the
/// issue says so.
#[test]
fn over_limit_services_serve_a_subset_chosen_per_node() {
    let big = translation(&service_yaml("big", "10.96.1.3", &[80], 1100));
    let subset = |node: &str| -> Vec<String> {
        let mut reconciler = Reconciler::adopt(FakeMaps::with_capacity(4096)).unwrap();
        reconciler.set_node_name(Some(node));
        let outcome = reconciler.update_service(&big.0, &big.1);
        assert_eq!(outcome.issues.len(), 1, "{:?}", outcome.issues);
        assert_eq!(outcome.issues[0].kind, IssueKind::Limit);
        assert!(
            outcome.issues[0]
                .reason
                .contains("this node serves its own subset of 1024"),
            "{}",
            outcome.issues[0].reason
        );
        let dump = reconciler.maps().dump().unwrap();
        assert_eq!(dump.frontends[0].slots.len(), 1024);
        view(&dump)[0]
            .split(" -> ")
            .nth(1)
            .unwrap()
            .split(' ')
            .map(str::to_owned)
            .collect()
    };
    let a = subset("node-a");
    assert_eq!(a, subset("node-a"), "deterministic per node");
    let mut union: std::collections::BTreeSet<String> = a.iter().cloned().collect();
    let mut differ = 0;
    for node in ["node-b", "node-c", "node-d", "node-e"] {
        let other = subset(node);
        differ += usize::from(other != a);
        union.extend(other);
    }
    assert_eq!(differ, 4, "every node picks its own subset");
    // Five nodes each leaving out 76 of 1100: together they cover nearly
    // all (all but ~76·(76/1100)^4 ≈ 0.002 expected).
    assert!(
        union.len() >= 1098,
        "{} of 1100 endpoints served",
        union.len()
    );
}

#[test]
fn node_subset_changes_little_when_endpoints_come_and_go() {
    use datapath_user::{k8s::Endpoint, reconcile::node_subset};
    let endpoints: Vec<Endpoint> = (0..1200u32)
        .map(|i| Endpoint {
            address: Ipv4Addr::from(0x0af4_0000 + i),
            port: 8080,
        })
        .collect();
    let (before, _) = node_subset(&endpoints, 1024, 7);
    let (after, _) = node_subset(&endpoints[1..], 1024, 7);
    let before: std::collections::BTreeSet<_> = before.into_iter().collect();
    let kept = after.iter().filter(|e| before.contains(e)).count();
    assert!(
        kept >= 1023,
        "one endpoint gone moved {} members",
        1024 - kept
    );
}

/// Backends leaving a UDP frontend are reported (socket-LB's connected UDP
/// sockets on them must go); draining ones only once they leave the slice
/// for good; TCP frontends report nothing (their connections fail fast).
#[test]
fn backends_leaving_udp_frontends_are_reported() {
    let dns = |endpoints: &[(&str, bool)]| {
        let mut text = "apiVersion: v1\nkind: Service\nmetadata: {name: dns, namespace: test}\nspec:\n  clusterIP: 10.96.3.1\n  ports: [{name: dns, port: 53, protocol: UDP}, {name: tcp, port: 53, protocol: TCP}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dns-1\n  namespace: test\n  labels: {kubernetes.io/service-name: dns}\naddressType: IPv4\nports: [{name: dns, port: 1053, protocol: UDP}, {name: tcp, port: 1053, protocol: TCP}]\nendpoints:\n".to_owned();
        for (address, ready) in endpoints {
            text += &format!("- addresses: [{address}]\n  conditions: {{ready: {ready}}}\n");
        }
        translation(&text)
    };
    let mut reconciler = Reconciler::adopt(FakeMaps::with_capacity(64)).unwrap();
    let both = dns(&[("10.244.0.1", true), ("10.244.0.2", true)]);
    assert!(
        reconciler
            .update_service(&both.0, &both.1)
            .departed
            .is_empty()
    );
    let draining = dns(&[("10.244.0.1", true), ("10.244.0.2", false)]);
    assert!(
        reconciler
            .update_service(&draining.0, &draining.1)
            .departed
            .is_empty(),
        "a draining backend has not left"
    );
    let gone = dns(&[("10.244.0.1", true)]);
    let departed = reconciler.update_service(&gone.0, &gone.1).departed;
    assert_eq!(departed.len(), 1, "{departed:?}");
    assert_eq!(departed[0].backend.to_string(), "10.244.0.2:1053/UDP");
    let deleted = reconciler
        .update_service(&gone.0, &Default::default())
        .departed;
    assert_eq!(deleted.len(), 1, "the service's deletion: {deleted:?}");
    assert_eq!(deleted[0].backend.to_string(), "10.244.0.1:1053/UDP");
}

#[test]
fn a_service_that_does_not_fit_is_an_issue_naming_the_map_and_the_rest_is_served() {
    // SLOTS holds 4096 slots here: four services of 1000 backends (a
    // block of 1024 each) fit, a fifth does not.
    let mut datapath = common::load_private();
    let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        apply(
            &mut reconciler,
            &translation(&service_yaml(
                name,
                &format!("10.96.2.{}", i + 1),
                &[80],
                1000,
            )),
        );
    }
    let fifth = translation(&service_yaml("e", "10.96.2.9", &[80], 1000));
    let outcome = reconciler.update_service(&fifth.0, &fifth.1);
    assert_eq!(outcome.issues.len(), 1, "{:?}", outcome.issues);
    let issue = &outcome.issues[0];
    assert_eq!(issue.object, "Service test/e");
    assert!(
        issue.reason.contains("10.96.2.9:80")
            && issue.reason.contains("SLOTS")
            && issue.reason.contains("--backend-slots-max"),
        "names the frontend, the map and the flag: {}",
        issue.reason
    );
    let dump = reconciler.maps().dump().unwrap();
    let served: Vec<(String, usize)> = dump
        .frontends
        .iter()
        .map(|f| (f.frontend.address.to_string(), f.slots.len()))
        .collect();
    for i in 1..=4 {
        assert!(
            served.contains(&(format!("10.96.2.{i}"), 1000)),
            "the others keep all their backends: {served:?}"
        );
    }
    assert!(
        !served.iter().any(|(address, _)| address == "10.96.2.9"),
        "no frontend without its slots: {served:?}"
    );
    assert_eq!(reconciler.maps().slots_taken(), Some(4096));
    // A service removed: its block, once rested, is the fifth one's.
    apply(&mut reconciler, &gone("d"));
    let outcome = reconciler.update_service(&fifth.0, &fifth.1);
    assert!(outcome.issues.is_empty(), "{:?}", outcome.issues);
    let dump = reconciler.maps().dump().unwrap();
    assert!(
        dump.frontends
            .iter()
            .all(|f| f.slots.len() == 1000 && f.slots.iter().all(Option::is_some)),
        "{:?}",
        view(&dump)
    );
}

/// A sync's new frontends are written together at the flush (one batch
/// per map), on real maps: nothing before it, every frontend whole after
/// it, in make-before-break order. A frontend whose block does not fit
/// (a full SLOTS map) is an issue of its own service, held broken, and
/// written once there is room; the others are served.
#[test]
fn new_frontends_are_written_together_and_one_that_does_not_fit_is_named() {
    use datapath_user::{Datapath, LoadOptions, loader::MapSizes};
    // Room for two services of one port and ten endpoints (a block of 16
    // slots each), not three.
    let mut datapath = Datapath::load(&LoadOptions {
        sizes: MapSizes {
            slots: 32,
            ..MapSizes::default()
        },
        ..LoadOptions::default()
    })
    .unwrap();
    let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
    let services: Vec<_> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            translation(&service_yaml(
                name,
                &format!("10.96.9.{}", i + 1),
                &[80],
                10,
            ))
        })
        .collect();
    reconciler.defer_new_frontends();
    for (key, t) in &services {
        let outcome = reconciler.update_service(key, t);
        assert!(outcome.issues.is_empty(), "{:?}", outcome.issues);
    }
    assert!(
        reconciler.maps().dump().unwrap().frontends.is_empty(),
        "nothing written before the flush"
    );
    let issues = reconciler.flush();
    assert_eq!(issues.len(), 1, "{issues:?}");
    let (owner, issue) = &issues[0];
    assert_eq!(owner, &ObjectKey::new("test", "c"));
    assert_eq!(issue.kind, IssueKind::Datapath);
    assert!(issue.to_string().contains("10.96.9.3"), "{issue}");
    let dump = reconciler.maps().dump().unwrap();
    let served: Vec<String> = view(&dump);
    assert_eq!(served.len(), 2, "{served:?}");
    assert!(
        dump.frontends
            .iter()
            .all(|f| f.slots.len() == 10 && f.slots.iter().all(Option::is_some)),
        "every written frontend whole: {dump:?}"
    );

    // Room made (a removed), the broken one is written on the next try.
    apply(&mut reconciler, &gone("a"));
    let outcome = reconciler.update_service(&services[2].0, &services[2].1);
    assert!(outcome.issues.is_empty(), "{:?}", outcome.issues);
    assert_eq!(outcome.frontends_written, 1);
    assert_eq!(view(&reconciler.maps().dump().unwrap()).len(), 2);
}

/// The frontend entries' batch does not fit (a full SERVICES map): the
/// frontends whose entry did not make it give their blocks back and their
/// filter counts go down (nothing names them), and the one that still
/// does not fit on its own is named.
#[test]
fn frontends_whose_entry_did_not_fit_leave_no_slots_behind() {
    use datapath_user::{Datapath, LoadOptions, loader::MapSizes};
    // Three services of two endpoints: two of the three frontend entries
    // fit.
    let mut datapath = Datapath::load(&LoadOptions {
        sizes: MapSizes {
            services: 2,
            ..MapSizes::default()
        },
        ..LoadOptions::default()
    })
    .unwrap();
    let mut reconciler = Reconciler::new_on_empty(&mut datapath.maps);
    let services: Vec<_> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, name)| translation(&service_yaml(name, &format!("10.96.9.{}", i + 1), &[80], 2)))
        .collect();
    reconciler.defer_new_frontends();
    for (key, t) in &services {
        let outcome = reconciler.update_service(key, t);
        assert!(outcome.issues.is_empty(), "{:?}", outcome.issues);
    }
    let issues = reconciler.flush();
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_eq!(issues[0].0, ObjectKey::new("test", "c"));
    let dump = reconciler.maps().dump().unwrap();
    assert_eq!(view(&dump).len(), 2, "{dump:?}");
    assert_eq!(
        reconciler.maps().slots_taken(),
        Some(4),
        "two frontends with a block of two each, nothing of the third"
    );
    let filter_count = |address: [u8; 4]| {
        let bucket = datapath_common::lb::service_filter_index(
            u32::from_ne_bytes(address),
            80u16.to_be(),
            6,
        );
        reconciler.maps().service_filter.get(&bucket, 0).unwrap()
    };
    assert_eq!(
        [
            filter_count([10, 96, 9, 1]),
            filter_count([10, 96, 9, 2]),
            filter_count([10, 96, 9, 3])
        ],
        [1, 1, 0],
        "the filter counts the frontends the maps hold"
    );
}

/// Frontends found in pinned maps keep their blocks: a later agent
/// learns whose each block is (at adoption, before it reads the maps), so
/// a new frontend never gets slots another still balances over. An entry
/// whose block is another's too (nothing this agent writes; a hand-made
/// one here) is moved to a block of its own with a copy of its slots;
/// removing it later frees its own block, not the one it shared.
#[test]
fn blocks_found_in_the_maps_stay_their_frontends_and_shared_ones_are_parted() {
    use datapath_user::{LoadOptions, loader::MapSizes, map_pins::PinPolicy};
    common::require_root("pinned maps");
    // Removed also when an assertion or the load fails.
    let pins = common::PinDir::new();
    let pin_dir = pins.path();
    let options = LoadOptions {
        pin_dir: Some(pin_dir.clone()),
        pin_policy: PinPolicy::Own,
        sizes: MapSizes {
            slots: 64,
            ..MapSizes::default()
        },
        ..LoadOptions::default()
    };
    let web = translation(&service_yaml("web", "10.96.1.1", &[80], 3));
    let api = translation(&service_yaml("api", "10.96.1.2", &[80], 5));
    {
        // The agent before (another process: its own view of the blocks).
        let mut first = datapath_user::Datapath::load(&options).unwrap();
        let mut reconciler = Reconciler::new_on_empty(&mut first.maps);
        apply(&mut reconciler, &web);
        apply(&mut reconciler, &api);
    }
    let mut datapath = datapath_user::Datapath::load(&options).unwrap();
    let key_of = |address: [u8; 4]| {
        datapath_common::maps::ServiceKey::new(u32::from_ne_bytes(address), 80u16.to_be(), 6)
    };
    // A third entry naming web's block.
    let web_head = datapath
        .maps
        .services
        .get(&key_of([10, 96, 1, 1]), 0)
        .unwrap();
    let mut twin = web_head;
    twin.rev_nat_low = 999;
    datapath
        .maps
        .services
        .insert(key_of([10, 96, 1, 3]), twin, 0)
        .unwrap();
    let before = datapath.maps.dump().unwrap();
    let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
    let blocks_apart = |maps: &datapath_user::maps::DatapathMaps| {
        let heads: Vec<_> = maps.services.iter().map(Result::unwrap).collect();
        for (i, (_, a)) in heads.iter().enumerate() {
            assert!(u32::from(a.backend_count) <= a.slot_capacity());
            for (_, b) in &heads[i + 1..] {
                let (a0, a1) = (a.first_slot, a.first_slot + a.slot_capacity());
                let (b0, b1) = (b.first_slot, b.first_slot + b.slot_capacity());
                assert!(a1 <= b0 || b1 <= a0, "blocks overlap: {heads:?}");
            }
        }
        heads.len()
    };
    assert_eq!(blocks_apart(reconciler.maps()), 3, "parted at adoption");
    let adopted = reconciler.maps().dump().unwrap();
    for frontend in &before.frontends {
        let now = adopted
            .frontends
            .iter()
            .find(|f| f.frontend == frontend.frontend)
            .expect("still there");
        assert_eq!(
            now.slots, frontend.slots,
            "{} keeps its backends",
            frontend.frontend
        );
    }
    // The twin goes (nothing asks for it); then new services fill every
    // free block: none may land on web's or api's slots.
    apply(&mut reconciler, &web);
    apply(&mut reconciler, &api);
    reconciler.prune(false).unwrap();
    let mut added = 0;
    for i in 0.. {
        let name = format!("fill{i}");
        let fill = translation(&service_yaml(
            &name,
            &format!("10.96.2.{}", i + 1),
            &[80],
            4,
        ));
        let outcome = reconciler.update_service(&fill.0, &fill.1);
        if !outcome.issues.is_empty() {
            assert!(
                outcome.issues[0].reason.contains("SLOTS"),
                "{:?}",
                outcome.issues
            );
            break;
        }
        added += 1;
    }
    // 64 slots: web and api take 4 + 8, so 13 blocks of four are left.
    assert_eq!(added, 13);
    assert_eq!(blocks_apart(reconciler.maps()), 2 + 13);
    let after = reconciler.maps().dump().unwrap();
    for name in ["10.96.1.1", "10.96.1.2"] {
        let was = before
            .frontends
            .iter()
            .find(|f| f.frontend.address.to_string() == name);
        let now = after
            .frontends
            .iter()
            .find(|f| f.frontend.address.to_string() == name);
        assert_eq!(
            now.map(|f| &f.slots),
            was.map(|f| &f.slots),
            "{name} keeps its backends"
        );
    }
}

/// A frontend's backend set rewritten in place while it fits its block
/// (and uses more than a quarter of it), moved whole to a block of the
/// right size otherwise; each time the frontend names exactly the new set
/// in order, and the left blocks become free again.
#[test]
fn a_backend_set_changes_in_place_while_it_fits_its_block_and_moves_otherwise() {
    use datapath_user::model::BackendEntry;
    let mut datapath = common::load_private();
    let maps = &mut datapath.maps;
    let frontend = Frontend {
        address: Ipv4Addr::new(10, 96, 7, 7),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let set = |n: u32, base: u32| -> Vec<BackendEntry> {
        (0..n)
            .map(|i| BackendEntry {
                id: base + i,
                address: Ipv4Addr::new(10, 244, 7, (base + i) as u8),
                port: 8080,
            })
            .collect()
    };
    let mut previous: Option<datapath_common::maps::ServiceValue> = None;
    // Blocks the frontend left, as [start, end).
    let mut left: Vec<(u32, u32)> = Vec::new();
    for (n, base, moves) in [
        (3, 1, true),
        (4, 10, false),
        (5, 20, true),
        (8, 30, false),
        (3, 40, false),
        (2, 50, true),
        (17, 60, true),
        (0, 0, true),
        (2, 90, true),
    ] {
        maps.set_service(&frontend, 7, &set(n, base)).unwrap();
        let head = maps.services.get(&frontend.key(), 0).unwrap();
        assert_eq!(u32::from(head.backend_count), n);
        let capacity = head.slot_capacity();
        assert!(
            n <= capacity && (capacity <= 2 || n * 4 > capacity),
            "{n} in {head:?}"
        );
        if let Some(old) = previous {
            let moved = old.first_slot != head.first_slot || old.slot_order != head.slot_order;
            assert_eq!(
                moved, moves,
                "{n} backends after {}: {old:?} -> {head:?}",
                old.backend_count
            );
            if moved {
                left.push((old.first_slot, old.first_slot + old.slot_capacity()));
            }
        }
        assert_eq!(
            maps.backend_ids_of(&frontend.key()).unwrap().unwrap(),
            (base..base + n).collect::<Vec<_>>()
        );
        previous = Some(head);
    }
    // Left blocks rest until a grace period (waited for at the end of a
    // sync): a frontend written meanwhile gets none of them...
    let block_of = |maps: &datapath_user::maps::DatapathMaps, f: &Frontend| {
        let head = maps.services.get(&f.key(), 0).unwrap();
        (head.first_slot, head.first_slot + head.slot_capacity())
    };
    let other = Frontend {
        port: 81,
        ..frontend
    };
    maps.set_service(&other, 8, &set(1, 100)).unwrap();
    let (start, end) = block_of(maps, &other);
    assert!(
        left.iter().all(|&(a, b)| end <= a || b <= start),
        "{start}..{end} is a left block: {left:?}"
    );
    // ... and once the grace period passed, only the last block and the
    // other frontend's are taken.
    assert!(maps.slots_taken() > Some(2 + 1));
    assert!(maps.flush().is_empty());
    assert_eq!(maps.slots_taken(), Some(2 + 1));
}

/// An array map made without `BPF_F_MMAPABLE`, as the release before the
/// slot array made `BACKENDS`.
fn array_without_mmap(value_size: u32, max_entries: u32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    #[repr(C)]
    struct Attr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let mut attr = Attr {
        map_type: 2, // BPF_MAP_TYPE_ARRAY
        key_size: 4,
        value_size,
        max_entries,
        map_flags: 0,
    };
    // SAFETY: bpf(BPF_MAP_CREATE) with an attr of its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            &mut attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd owned by nobody else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

/// An upgrade from the release before the slot array: its pins hold a
/// `BACKENDS` made without `BPF_F_MMAPABLE`, `SERVICES` of layout v3, no
/// `SLOTS`, and one shared marker (`maps-abi-v3`). The agent carries
/// `BACKENDS`' entries into a mapped one under the same ids, makes
/// `SERVICES` and `SLOTS` anew, keeps conntrack and `REVERSE_NAT`, and
/// programs the service again under the ids its tracked flows name.
#[test]
fn an_upgrade_from_the_release_before_the_slot_array_keeps_conntrack_and_every_id() {
    use aya::maps::{Array, Map, MapData, MapInfo};
    use datapath_common::maps::{
        BACKENDS_MAP, BPF_F_MMAPABLE, Backend, CONNTRACK_TCP_MAP, CONNTRACK_UDP_MAP,
        REVERSE_NAT_MAP, SERVICES_MAP, SLOTS_MAP,
    };
    use datapath_user::{LoadOptions, map_pins::PinPolicy};
    common::require_root("pinned maps");
    // Removed also when an assertion or the load fails.
    let pins = common::PinDir::new();
    let pin_dir = pins.path();
    let options = LoadOptions {
        pin_dir: Some(pin_dir.clone()),
        pin_policy: PinPolicy::Own,
        ..LoadOptions::default()
    };
    let web = translation(&service_yaml("web", "10.96.1.1", &[80], 3));
    let programmed = {
        let mut datapath = datapath_user::Datapath::load(&options).unwrap();
        let mut reconciler = Reconciler::new_on_empty(&mut datapath.maps);
        // Another service first, gone again: web's ids are not the first
        // ones an agent starting afresh would hand out.
        let other = translation(&service_yaml("other", "10.96.1.9", &[80], 7));
        apply(&mut reconciler, &other);
        apply(&mut reconciler, &gone("other"));
        apply(&mut reconciler, &web);
        reconciler.prune(false).unwrap();
        reconciler.maps().dump().unwrap()
    };
    assert!(
        programmed.backends.iter().all(|(id, _)| *id > 3),
        "{:?}",
        programmed.backends
    );
    // The older release's BACKENDS: the same entries in a plain array.
    let backends_pin = pin_dir.join(BACKENDS_MAP);
    let current: Array<MapData, Backend> =
        Array::try_from(Map::Array(MapData::from_pin(&backends_pin).unwrap())).unwrap();
    let len = current.len();
    let old = MapData::from_fd(array_without_mmap(8, len)).unwrap();
    let mut old: Array<MapData, Backend> = Array::try_from(Map::Array(old)).unwrap();
    let mut present = 0;
    for id in 0..len {
        let backend = current.get(&id, 0).unwrap();
        if backend.is_present() {
            old.set(id, backend, 0).unwrap();
            present += 1;
        }
    }
    assert_eq!(present, 3);
    drop(current);
    std::fs::remove_file(&backends_pin).unwrap();
    aya::maps::IterableMap::map(&old)
        .pin(&backends_pin)
        .unwrap();
    drop(old);
    // No SLOTS; one shared marker, which says SERVICES is at v3.
    std::fs::remove_file(pin_dir.join(SLOTS_MAP)).unwrap();
    std::fs::remove_dir_all(pin_dir.join(datapath_user::map_pins::LAYOUTS_DIR)).unwrap();
    std::fs::create_dir(pin_dir.join("maps-abi-v3")).unwrap();
    let map_id = |map: &str| MapInfo::from_pin(pin_dir.join(map)).unwrap().id();
    let kept = [CONNTRACK_TCP_MAP, CONNTRACK_UDP_MAP, REVERSE_NAT_MAP];
    let kept_ids: Vec<u32> = kept.iter().map(|m| map_id(m)).collect();
    let (backends_id, services_id) = (map_id(BACKENDS_MAP), map_id(SERVICES_MAP));

    let mut datapath = datapath_user::Datapath::load(&options).unwrap();
    assert_eq!(
        kept.iter().map(|m| map_id(m)).collect::<Vec<_>>(),
        kept_ids,
        "conntrack and reverse NAT kept"
    );
    assert_ne!(map_id(SERVICES_MAP), services_id, "SERVICES v3 replaced");
    assert_ne!(map_id(BACKENDS_MAP), backends_id, "BACKENDS made mapped");
    let flags = MapInfo::from_pin(&backends_pin).unwrap().map_flags();
    assert_ne!(flags & BPF_F_MMAPABLE, 0);
    assert!(!pin_dir.join(format!("{BACKENDS_MAP}-carried-v3")).exists());
    assert_eq!(
        datapath.maps.dump().unwrap().backends,
        programmed.backends,
        "carried before any sync"
    );
    let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
    apply(&mut reconciler, &web);
    reconciler.prune(false).unwrap();
    assert_eq!(
        reconciler.maps().dump().unwrap(),
        programmed,
        "the same backend and reverse-NAT ids"
    );
    drop(reconciler);
    drop(datapath);

    // An agent stopped in the middle of such a carry (the old map set
    // aside, the new one not yet written): the next start carries it.
    let carried = pin_dir.join(format!("{BACKENDS_MAP}-carried-v3"));
    std::fs::rename(&backends_pin, &carried).unwrap();
    // The CNI plugin meanwhile neither finishes it nor fills the gap.
    let refused = datapath_user::Datapath::load(&LoadOptions {
        pin_policy: PinPolicy::Adopt,
        ..options.clone()
    })
    .err()
    .expect("an Adopt load waits for the carry")
    .to_string();
    assert!(refused.contains("carrying"), "{refused}");
    assert!(!backends_pin.exists());
    let mut datapath = datapath_user::Datapath::load(&options).unwrap();
    assert_eq!(
        datapath.maps.dump().unwrap().backends,
        programmed.backends,
        "the interrupted carry finished"
    );
    assert_eq!(
        kept.iter().map(|m| map_id(m)).collect::<Vec<_>>(),
        kept_ids,
        "conntrack still kept"
    );
    assert!(!carried.exists());
    let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
    apply(&mut reconciler, &web);
    reconciler.prune(false).unwrap();
    assert_eq!(reconciler.maps().dump().unwrap(), programmed);
}

/// An upgrade from a build without the IPv6 maps: they are made, and
/// every IPv4 map is kept (no program attached can read a map the
/// installation never had). Sizing the IPv6 maps later (`MapSizes::ipv6`)
/// makes `SERVICES6` anew, and with it `SLOTS` and `SERVICES` (their
/// blocks are one array), while conntrack, `BACKENDS` and `REVERSE_NAT`
/// stay: the service is programmed again under the ids its tracked flows
/// name.
#[test]
fn an_upgrade_that_adds_the_ipv6_maps_keeps_the_ipv4_ones() {
    use aya::maps::MapInfo;
    use datapath_common::maps::{
        ALL_MAPS, BACKENDS_MAP, CONNTRACK_TCP_MAP, CONNTRACK_UDP_MAP, IPV6_MAPS, REVERSE_NAT_MAP,
        SERVICES_MAP, SERVICES6_MAP, SLOTS_MAP,
    };
    use datapath_user::{LoadOptions, loader::MapSizes, map_pins::PinPolicy};
    common::require_root("pinned maps");
    let pins = common::PinDir::new();
    let pin_dir = pins.path();
    let options = LoadOptions {
        pin_dir: Some(pin_dir.clone()),
        pin_policy: PinPolicy::Own,
        ..LoadOptions::default()
    };
    let web = translation(&service_yaml("web", "10.96.1.1", &[80], 3));
    let programmed = {
        let mut datapath = datapath_user::Datapath::load(&options).unwrap();
        let mut reconciler = Reconciler::new_on_empty(&mut datapath.maps);
        apply(&mut reconciler, &web);
        reconciler.prune(false).unwrap();
        reconciler.maps().dump().unwrap()
    };
    let v6 = IPV6_MAPS;
    // The older build: no IPv6 map pinned, none marked.
    let layouts = pin_dir.join(datapath_user::map_pins::LAYOUTS_DIR);
    for map in v6 {
        std::fs::remove_file(pin_dir.join(map)).unwrap();
        std::fs::remove_dir(layouts.join(format!("{map}-v1"))).unwrap();
    }
    // The CLI reads such pins too (the IPv6 maps absent, nothing of them
    // shown).
    let older = datapath_user::DatapathMaps::open_pinned(&pin_dir).unwrap();
    assert!(older.v6.is_none());
    assert_eq!(older.dump().unwrap(), programmed);
    drop(older);
    let map_id = |map: &str| MapInfo::from_pin(pin_dir.join(map)).unwrap().id();
    let v4: Vec<&str> = ALL_MAPS.into_iter().filter(|m| !v6.contains(m)).collect();
    let v4_ids: Vec<u32> = v4.iter().map(|m| map_id(m)).collect();

    let datapath = datapath_user::Datapath::load(&options).unwrap();
    assert_eq!(
        v4.iter().map(|m| map_id(m)).collect::<Vec<_>>(),
        v4_ids,
        "every IPv4 map kept: {v4:?}"
    );
    assert!(v6.iter().all(|m| pin_dir.join(m).exists()), "made");
    assert!(
        layouts.join(format!("{SERVICES6_MAP}-v1")).exists(),
        "marked"
    );
    assert_eq!(datapath.maps.dump().unwrap(), programmed);
    drop(datapath);

    // IPv6 sized: SERVICES6 grows, and takes the slot array and SERVICES.
    let kept = [
        BACKENDS_MAP,
        CONNTRACK_TCP_MAP,
        CONNTRACK_UDP_MAP,
        REVERSE_NAT_MAP,
    ];
    let kept_ids: Vec<u32> = kept.iter().map(|m| map_id(m)).collect();
    let remade = [SERVICES6_MAP, SLOTS_MAP, SERVICES_MAP];
    let remade_ids: Vec<u32> = remade.iter().map(|m| map_id(m)).collect();
    let mut datapath = datapath_user::Datapath::load(&LoadOptions {
        sizes: MapSizes {
            ipv6: true,
            ..MapSizes::default()
        },
        ..options.clone()
    })
    .unwrap();
    assert_eq!(
        kept.iter().map(|m| map_id(m)).collect::<Vec<_>>(),
        kept_ids,
        "{kept:?} kept"
    );
    for (map, old) in remade.iter().zip(remade_ids) {
        assert_ne!(map_id(map), old, "{map} made anew");
    }
    assert_eq!(
        MapInfo::from_pin(pin_dir.join(SERVICES6_MAP))
            .unwrap()
            .max_entries(),
        MapSizes::default().services
    );
    let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
    apply(&mut reconciler, &web);
    reconciler.prune(false).unwrap();
    assert_eq!(
        reconciler.maps().dump().unwrap(),
        programmed,
        "the same backend and reverse-NAT ids"
    );
    drop(reconciler);
    drop(datapath);

    // An agent stopped while replacing SLOTS (its marker and pin gone,
    // the service maps not yet): a map the installation had takes its
    // followers with it, IPv6 ones included.
    std::fs::remove_dir(layouts.join(format!("{SLOTS_MAP}-v1"))).unwrap();
    std::fs::remove_file(pin_dir.join(SLOTS_MAP)).unwrap();
    let followers = [SERVICES_MAP, SERVICES6_MAP];
    let follower_ids: Vec<u32> = followers.iter().map(|m| map_id(m)).collect();
    let ipv6 = LoadOptions {
        sizes: MapSizes {
            ipv6: true,
            ..MapSizes::default()
        },
        ..options.clone()
    };
    drop(datapath_user::Datapath::load(&ipv6).unwrap());
    for (map, old) in followers.iter().zip(follower_ids) {
        assert_ne!(map_id(map), old, "{map} goes with the removed SLOTS");
    }
}

/// `SLOTS` and `BACKENDS` count in the agent's resident memory only while
/// mapped: nothing maps them at load (the attach loop's handles never
/// do), a write maps only the windows it touches, and the end of a pass
/// (`flush`) unmaps them — and the values stay in the maps.
#[test]
fn mapped_arrays_are_mapped_only_while_a_pass_writes() {
    let mut datapath = common::load_private();
    let maps = &mut datapath.maps;
    assert_eq!(
        (maps.slots.windows_mapped(), maps.backends.windows_mapped()),
        (0, 0),
        "mapped at load"
    );
    let mut reconciler = Reconciler::adopt(&mut *maps).unwrap();
    assert_eq!(
        (
            reconciler.maps().slots.windows_mapped(),
            reconciler.maps().backends.windows_mapped()
        ),
        (0, 0),
        "mapped after adoption's reads"
    );
    reconciler.maps_mut().defer_new_frontends();
    apply(
        &mut reconciler,
        &translation(&service_yaml("web", "10.96.1.1", &[80], 3)),
    );
    assert!(reconciler.maps_mut().flush().is_empty());
    apply(
        &mut reconciler,
        &translation(&service_yaml("web", "10.96.1.1", &[80], 4)),
    );
    let maps = reconciler.maps();
    assert!(
        maps.slots.windows_mapped() >= 1 && maps.backends.windows_mapped() >= 1,
        "a write maps its windows"
    );
    // (These arrays are one window each; that a write maps only its own
    // windows is `mapped_array`'s unit test.)
    assert!(reconciler.maps_mut().flush().is_empty());
    let maps = reconciler.maps();
    assert_eq!(
        (maps.slots.windows_mapped(), maps.backends.windows_mapped()),
        (0, 0),
        "mapped after the pass"
    );
    assert_eq!(
        view(&maps.dump().unwrap()),
        [
            "10.96.1.1:80/TCP -> 10.244.0.1:8080/TCP 10.244.0.2:8080/TCP 10.244.0.3:8080/TCP 10.244.0.4:8080/TCP"
        ]
    );
}

/// A dual-stack service: both families are programmed, each over the
/// slices of its `addressType`, with ids from one space; its IPv6
/// frontends are one issue naming its IPv6 ClusterIP (the IPv6 packet
/// path is not built yet). Maps without room for IPv6 get the IPv4 family
/// alone; dropping a family removes its frontends, backends and
/// reverse-NAT entries, and a restart adopts both families' ids.
#[test]
fn a_dual_stack_service_programs_both_families_and_its_ipv6_frontends_are_one_issue() {
    let yaml = "\
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: test}
spec:
  clusterIP: 10.96.60.1
  clusterIPs: [10.96.60.1, \"fd00:10:96::60\"]
  ipFamilies: [IPv4, IPv6]
  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dual-v4, namespace: test, labels: {kubernetes.io/service-name: dual}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 53, protocol: UDP}]
endpoints: [{addresses: [10.244.6.1]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dual-v6, namespace: test, labels: {kubernetes.io/service-name: dual}}
addressType: IPv6
ports: [{name: http, port: 8080}, {name: dns, port: 53, protocol: UDP}]
endpoints: [{addresses: [\"fd00:10:244::6:1\"]}]
";
    let (key, translation) = translation(yaml);
    assert_eq!(translation.frontends.len(), 2);
    assert_eq!(translation.frontends6.len(), 2);
    let issues: Vec<String> = translation.issues.iter().map(|i| i.to_string()).collect();
    assert_eq!(
        issues,
        [
            "Service test/dual spec.clusterIPs[1]: IPv6 frontends are not served: the agent runs without --ipv6 on (2 of them, [fd00:10:96::60]:53/UDP first); its IPv4 family is served (unsupported)"
        ]
    );
    // Served (`--ipv6 on`): the same frontends, no issue.
    let on = NodeContext {
        ipv6: Ipv6Serving::On,
        ..NodeContext::default()
    };
    let (_, served) = translation_on(yaml, &on);
    assert_eq!(served.frontends6, translation.frontends6);
    assert!(served.issues.is_empty(), "{:?}", served.issues);
    let v4_only = [
        "10.96.60.1:53/UDP -> 10.244.6.1:53/UDP",
        "10.96.60.1:80/TCP -> 10.244.6.1:8080/TCP",
    ];
    let both = [
        v4_only.as_slice(),
        &[
            "[fd00:10:96::60]:53/UDP -> [fd00:10:244::6:1]:53/UDP",
            "[fd00:10:96::60]:80/TCP -> [fd00:10:244::6:1]:8080/TCP",
        ],
    ]
    .concat();

    // Maps sized without IPv6: the IPv4 family alone.
    let mut v4_maps = FakeMaps::with_capacity(64);
    v4_maps.ipv6 = false;
    let mut reconciler = Reconciler::adopt(v4_maps).unwrap();
    let outcome = reconciler.update_service(&key, &translation);
    assert!(outcome.issues.is_empty(), "{:?}", outcome.issues);
    assert_eq!(view(&reconciler.maps().dump().unwrap()), v4_only);

    let mut reconciler = Reconciler::adopt(FakeMaps::with_capacity(64)).unwrap();
    let outcome = reconciler.update_service(&key, &translation);
    assert!(outcome.issues.is_empty(), "{:?}", outcome.issues);
    assert_eq!(outcome.frontends_written, 4);
    let dump = reconciler.maps().dump().unwrap();
    assert_eq!(view(&dump), both);
    // One id space: four frontends, four reverse-NAT ids; two backends
    // per family (one per port), four backend ids.
    let mut rev_nat_ids: Vec<_> = (dump.frontends.iter().map(|f| f.rev_nat_id))
        .chain(dump.frontends6.iter().map(|f| f.rev_nat_id))
        .collect();
    rev_nat_ids.sort();
    rev_nat_ids.dedup();
    assert_eq!(rev_nat_ids.len(), 4);
    assert_eq!(dump.rev_nats6.len(), 2);
    assert_eq!(reconciler.ids_in_use(), (4, 4));

    // A restart adopts both families: the same sync writes nothing.
    let mut restarted = Reconciler::adopt(reconciler.into_maps()).unwrap();
    assert_eq!(restarted.ids_in_use(), (4, 4));
    let outcome = restarted.update_service(&key, &translation);
    assert_eq!(outcome.frontends_written, 0, "{outcome:?}");
    assert_eq!(restarted.prune(false).unwrap(), Default::default());

    // The service turns single-stack IPv4: its IPv6 entries go.
    let mut single = translation.clone();
    single.frontends6.clear();
    let outcome = restarted.update_service(&key, &single);
    assert_eq!(outcome.frontends_removed, 2);
    let dump = restarted.maps().dump().unwrap();
    assert_eq!(view(&dump), v4_only);
    assert!(
        dump.backends6.is_empty() && dump.rev_nats6.is_empty(),
        "{dump:?}"
    );
    assert_eq!(restarted.ids_in_use(), (2, 2));
}

/// Both families' frontends own blocks of one slot array: learning which
/// blocks are whose reads `SERVICES6` too, so that an IPv4 frontend is
/// never given an IPv6 frontend's slots, and an IPv6 entry sharing a
/// block (nothing this agent writes) is moved to a block of its own with
/// a copy of its slots.
#[test]
fn slot_blocks_are_learned_from_both_service_maps() {
    use datapath_common::{
        IPPROTO_TCP,
        maps::{ServiceKey6, ServiceValue},
        port_be,
    };
    use datapath_user::{
        DatapathMaps, LoadOptions, loader::MapSizes, map_pins::PinPolicy, model::ipv6_words,
    };
    common::require_root("pinned maps");
    let pins = common::PinDir::new();
    let pin_dir = pins.path();
    let options = LoadOptions {
        pin_dir: Some(pin_dir.clone()),
        pin_policy: PinPolicy::Own,
        sizes: MapSizes {
            ipv6: true,
            ..MapSizes::default()
        },
        ..LoadOptions::default()
    };
    let block = |head: ServiceValue| (head.first_slot, head.first_slot + head.slot_capacity());
    let key6 = |address: &str| {
        ServiceKey6::new(
            ipv6_words(address.parse().unwrap()),
            port_be(80),
            IPPROTO_TCP,
        )
    };
    let (shared6, own6) = (key6("fd00::1"), key6("fd00::2"));
    let web_key = Frontend {
        address: Ipv4Addr::new(10, 96, 1, 1),
        port: 80,
        protocol: Protocol::Tcp,
    }
    .key();
    let web_head = {
        let mut datapath = datapath_user::Datapath::load(&options).unwrap();
        let mut reconciler = Reconciler::new_on_empty(&mut datapath.maps);
        apply(
            &mut reconciler,
            &translation(&service_yaml("web", "10.96.1.1", &[80], 3)),
        );
        drop(reconciler);
        let maps = &mut datapath.maps;
        let web_head = maps.services.get(&web_key, 0).unwrap();
        // An IPv6 entry sharing web's block; another with a block of its
        // own next to it (the next one an allocator would hand out).
        let v6 = maps.v6.as_mut().expect("the IPv6 maps");
        v6.services6.insert(shared6, web_head, 0).unwrap();
        let (_, end) = block(web_head);
        let own_head = ServiceValue::new(end, web_head.slot_order, 1, 9, 0);
        maps.slots
            .write(end, [datapath_common::maps::Slot::of(1)].into_iter())
            .unwrap();
        maps.v6
            .as_mut()
            .unwrap()
            .services6
            .insert(own6, own_head, 0)
            .unwrap();
        web_head
    };

    let mut maps = DatapathMaps::open_pinned(&pin_dir).unwrap();
    maps.learn_slot_blocks().unwrap();
    assert_eq!(
        maps.services.get(&web_key, 0).unwrap(),
        web_head,
        "web keeps its block"
    );
    let v6 = maps.v6.as_ref().expect("the IPv6 maps");
    let moved = v6.services6.get(&shared6, 0).unwrap();
    let own = v6.services6.get(&own6, 0).unwrap();
    assert_ne!(block(moved), block(web_head), "the sharer moved");
    let slots_of = |maps: &DatapathMaps, head: ServiceValue| -> Vec<u32> {
        (1..=head.backend_count)
            .map(|slot| {
                maps.slots
                    .get(head.slot_index(slot))
                    .unwrap()
                    .unwrap()
                    .backend_id
            })
            .collect()
    };
    assert_eq!(
        slots_of(&maps, moved),
        slots_of(&maps, web_head),
        "with a copy of its slots"
    );
    assert_eq!(own.backend_count, 1);

    // A new IPv4 frontend takes none of the IPv6 frontends' blocks.
    let mut reconciler = Reconciler::adopt(&mut maps).unwrap();
    apply(
        &mut reconciler,
        &translation(&service_yaml("api", "10.96.1.2", &[80], 3)),
    );
    let api_key = Frontend {
        address: Ipv4Addr::new(10, 96, 1, 2),
        port: 80,
        protocol: Protocol::Tcp,
    }
    .key();
    let api = reconciler.maps().services.get(&api_key, 0).unwrap();
    let blocks = [block(web_head), block(moved), block(own), block(api)];
    for (i, a) in blocks.iter().enumerate() {
        for b in &blocks[i + 1..] {
            assert!(a.1 <= b.0 || b.1 <= a.0, "blocks overlap: {blocks:?}");
        }
    }
}

/// IPv6 entries written as the IPv6 writer does are read back by `dump`
/// (the `BACKENDS` entry flagged IPv6 with its address from
/// `BACKEND_ADDRS6`), and adoption keeps their ids: an IPv4 service
/// programmed after is given none of them; a prune removes them when no
/// service asks for them.
#[test]
fn ipv6_entries_are_read_their_ids_kept_and_pruned_when_unasked() {
    use datapath_common::{
        IPPROTO_TCP,
        maps::{
            BACKEND_FLAG_PRESENT, BACKEND_FLAG_V6, Backend, BackendAddress6, REV_NAT_FLAG_PRESENT,
            RevNatValue6, ServiceKey6, ServiceValue, Slot,
        },
        port_be,
    };
    use datapath_user::model::ipv6_words;
    let mut datapath = common::load_private();
    let maps = &mut datapath.maps;
    let (vip, pod): (std::net::Ipv6Addr, std::net::Ipv6Addr) = (
        "fd00:10:96::1".parse().unwrap(),
        "fd00:10:244::1".parse().unwrap(),
    );
    // As the IPv6 writer will: the address, then the entry that
    // publishes it; the slot; the reverse-NAT entry; the frontend.
    let v6 = maps.v6.as_mut().expect("the IPv6 maps");
    v6.backend_addrs6
        .set(
            1,
            BackendAddress6 {
                address_be: ipv6_words(pod),
            },
        )
        .unwrap();
    maps.backends
        .set(
            1,
            Backend {
                address_be: 0,
                port_be: port_be(8080),
                protocol: IPPROTO_TCP,
                flags: BACKEND_FLAG_PRESENT | BACKEND_FLAG_V6,
            },
        )
        .unwrap();
    maps.slots.set(0, Slot::of(1)).unwrap();
    v6.reverse_nat6
        .set(
            1,
            RevNatValue6 {
                address_be: ipv6_words(vip),
                port_be: port_be(80),
                flags: REV_NAT_FLAG_PRESENT,
                _pad: 0,
            },
            0,
        )
        .unwrap();
    v6.services6
        .insert(
            ServiceKey6::new(ipv6_words(vip), port_be(80), IPPROTO_TCP),
            ServiceValue::new(0, 0, 1, 1, 0),
            0,
        )
        .unwrap();

    let dump = maps.dump().unwrap();
    assert_eq!(dump.frontends6.len(), 1);
    assert_eq!(
        dump.frontends6[0].frontend.to_string(),
        "[fd00:10:96::1]:80/TCP"
    );
    assert_eq!(
        (dump.frontends6[0].rev_nat_id, &dump.frontends6[0].slots[..]),
        (1, &[Some(1)][..])
    );
    assert_eq!(dump.backends6.len(), 1);
    assert_eq!(dump.backends6[0].1.to_string(), "[fd00:10:244::1]:8080/TCP");
    assert!(dump.backends.is_empty(), "not taken for an IPv4 backend");
    assert_eq!(dump.rev_nats6.len(), 1);

    let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
    apply(
        &mut reconciler,
        &translation(&service_yaml("web", "10.96.1.1", &[80], 3)),
    );
    let dump = reconciler.maps().dump().unwrap();
    assert!(
        dump.backends.iter().all(|(id, _)| *id != 1),
        "an IPv6 backend's id: {:?}",
        dump.backends
    );
    assert!(dump.frontends.iter().all(|f| f.rev_nat_id != 1));
    assert_eq!(dump.frontends6.len(), 1, "the IPv6 frontend stands");
    assert_eq!(dump.backends6.len(), 1);
    // Nothing asks for it: the prune after the first sync removes it, its
    // backend and its reverse-NAT entry, and its filter bucket's count.
    let bucket =
        datapath_common::lb::service_filter_index6(ipv6_words(vip), port_be(80), IPPROTO_TCP);
    let report = reconciler.prune(false).unwrap();
    assert_eq!(
        (report.frontends, report.backends),
        (1, 0),
        "the backend goes with its frontend: {report:?}"
    );
    let dump = reconciler.maps().dump().unwrap();
    assert!(
        dump.frontends6.is_empty() && dump.backends6.is_empty() && dump.rev_nats6.is_empty(),
        "{dump:?}"
    );
    let ipv4_in_bucket = dump
        .frontends
        .iter()
        .filter(|f| {
            let key = f.frontend.key();
            datapath_common::lb::service_filter_index(key.address_be, key.port_be, key.protocol)
                == bucket
        })
        .count() as u32;
    assert_eq!(
        reconciler.maps().service_filter.get(&bucket, 0).unwrap(),
        ipv4_in_bucket,
        "the IPv6 frontend's filter bucket"
    );
}

/// One backend id space: an id a broken IPv6 frontend's slot names stays
/// reserved for it at adoption even where the IPv4 table holds an unused
/// entry under it (maps an interrupted agent left), so an IPv4 backend
/// never takes it, and the rewrite of the IPv6 frontend, which frees the
/// id, deletes nothing an IPv4 frontend uses.
#[test]
fn an_id_a_broken_ipv6_frontend_names_is_never_given_to_an_ipv4_backend() {
    let web = translation(&service_yaml("web", "10.96.1.1", &[80], 1));
    let v6 = translation(
        "\
apiVersion: v1
kind: Service
metadata: {name: six, namespace: test}
spec:
  clusterIP: \"fd00:10:96::70\"
  clusterIPs: [\"fd00:10:96::70\"]
  ipFamilies: [IPv6]
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: six-1, namespace: test, labels: {kubernetes.io/service-name: six}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [\"fd00:10:244::9\"]}]
",
    );
    let frontend6 = v6.1.frontends6[0].frontend;
    let mut maps = FakeMaps::with_capacity(64);
    // The IPv6 frontend's slot names id 5, whose backend entry is gone;
    // the IPv4 table holds an unused entry for web's endpoint under 5.
    maps.v6.services.insert(frontend6, (7, vec![5]));
    maps.v6
        .rev_nats
        .insert(7, (frontend6.address, frontend6.port));
    let endpoint = BackendAddress {
        address: Ipv4Addr::new(10, 244, 0, 1),
        port: 8080,
        protocol: Protocol::Tcp,
    };
    maps.v4.backends.insert(5, endpoint);

    let mut reconciler = Reconciler::adopt(maps).unwrap();
    apply(&mut reconciler, &web);
    let dump = reconciler.maps().dump().unwrap();
    let web_id = dump.frontends[0].slots[0].unwrap();
    assert_ne!(web_id, 5, "reserved for the broken IPv6 frontend");
    apply(&mut reconciler, &v6);
    reconciler.prune(false).unwrap();
    let dump = reconciler.maps().dump().unwrap();
    assert_eq!(
        view(&dump),
        [
            "10.96.1.1:80/TCP -> 10.244.0.1:8080/TCP",
            "[fd00:10:96::70]:80/TCP -> [fd00:10:244::9]:8080/TCP"
        ]
    );
    assert_eq!(dump.backends, [(web_id, endpoint)], "web's backend stands");
    assert_eq!(reconciler.ids_in_use(), (2, 2));
}

/// An IPv6 service `v6` at fd00:10:96::61 port 80 → 8080 over `pods`
/// (fd00:10:244::<n>).
fn ipv6_service_yaml(pods: &[u16]) -> String {
    let mut text = "\
apiVersion: v1
kind: Service
metadata: {name: v6, namespace: test}
spec:
  clusterIP: \"fd00:10:96::61\"
  ipFamilies: [IPv6]
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: v6-1, namespace: test, labels: {kubernetes.io/service-name: v6}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
"
    .to_owned();
    for pod in pods {
        text += &format!("- addresses: [\"fd00:10:244::{pod:x}\"]\n");
    }
    text
}

/// A backend id whose entry was deleted is handed out again only after
/// the programs running at the deletion have finished: an IPv6 backend is
/// two reads (its `BACKENDS` word, then its `BACKEND_ADDRS6` address), and
/// a program between them must not meet another pod's address under the
/// port it read. With every other id taken, the new backend waits for the
/// readers, then gets the id.
#[test]
fn a_deleted_backends_id_is_reused_only_after_the_readers_are_gone() {
    // Ids 1..=4.
    let mut reconciler = Reconciler::adopt(FakeMaps::with_capacity(5)).unwrap();
    apply(
        &mut reconciler,
        &translation(&ipv6_service_yaml(&[1, 2, 3])),
    );
    let id_of = |maps: &FakeMaps, pod: &str| {
        let address: std::net::Ipv6Addr = pod.parse().unwrap();
        maps.v6
            .backends
            .iter()
            .find(|(_, b)| b.address == address)
            .map(|(id, _)| *id)
    };
    let third = id_of(reconciler.maps(), "fd00:10:244::3").unwrap();
    reconciler.maps_mut().log.clear();
    // The third pod is replaced by a fourth (the last free id: written
    // before the third goes), then the fourth by a fifth: only the
    // third's id is left.
    apply(
        &mut reconciler,
        &translation(&ipv6_service_yaml(&[1, 2, 4])),
    );
    apply(
        &mut reconciler,
        &translation(&ipv6_service_yaml(&[1, 2, 5])),
    );
    let log = &reconciler.maps().log;
    let at = |entry: &str| {
        log.iter()
            .position(|l| l.starts_with(entry))
            .unwrap_or_else(|| panic!("no {entry:?} in {log:?}"))
    };
    assert_eq!(id_of(reconciler.maps(), "fd00:10:244::5"), Some(third));
    assert!(
        at(&format!("remove backend {third}")) < at("wait for readers")
            && at("wait for readers") < at(&format!("backend {third} = ")),
        "deleted, waited for, then reused: {log:?}"
    );
    // With a free id at hand, nothing waits.
    let mut roomy = Reconciler::adopt(FakeMaps::with_capacity(64)).unwrap();
    apply(&mut roomy, &translation(&ipv6_service_yaml(&[1, 2, 3])));
    apply(&mut roomy, &translation(&ipv6_service_yaml(&[1, 2, 4])));
    assert!(!roomy.maps().log.iter().any(|l| l == "wait for readers"));
}

/// `service_yaml` with `sessionAffinity: ClientIP` and `timeoutSeconds`.
fn with_affinity(yaml: &str, seconds: u32) -> String {
    yaml.replacen(
        "  ports:\n",
        &format!(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {seconds}}}}}\n  ports:\n"
        ),
        1,
    )
}

/// A frontend's affinity follows its slots in the safe order: after the
/// slots name a new set, before a backend that left is deleted (a client
/// must never be kept on an id that could be handed to another pod); a
/// new timeout alone is written without touching the slots; a removed
/// frontend loses it before its id is freed; and an agent that restarts
/// takes it from frontends that no longer ask (the first sync's prune).
#[test]
fn affinity_is_written_after_the_slots_and_before_departed_backends_go() {
    let mut reconciler = Reconciler::adopt(FakeMaps::with_capacity(64)).unwrap();
    let three = service_yaml("web", "10.96.1.1", &[80], 3);
    apply(&mut reconciler, &translation(&with_affinity(&three, 60)));
    assert_eq!(
        reconciler.maps().affinity,
        [(1, (60, vec![1, 2, 3]))].into(),
        "the frontend's timeout and backends"
    );
    reconciler.maps_mut().log.clear();
    let two = three.replace("- addresses: [10.244.0.1]\n", "");
    apply(&mut reconciler, &translation(&with_affinity(&two, 60)));
    assert_eq!(
        reconciler.maps().log,
        [
            "backend 2 = 10.244.0.2:8080",
            "backend 3 = 10.244.0.3:8080",
            "service 10.96.1.1:80/TCP",
            "affinity 1 60s [2, 3]",
            "remove backend 1",
        ]
    );
    reconciler.maps_mut().log.clear();
    let outcome = reconciler.update_service(
        &ObjectKey::new("test", "web"),
        &translation(&with_affinity(&two, 5)).1,
    );
    assert_eq!(outcome.frontends_written, 1, "a new timeout is a write");
    assert_eq!(reconciler.maps().log, ["affinity 1 5s [2, 3]"]);
    reconciler.maps_mut().log.clear();
    apply(&mut reconciler, &translation(&two));
    assert_eq!(reconciler.maps().log, ["affinity 1 off"], "taken away");
    apply(&mut reconciler, &translation(&with_affinity(&two, 5)));
    reconciler.maps_mut().log.clear();
    apply(&mut reconciler, &gone("web"));
    assert_eq!(
        reconciler.maps().log[..2],
        ["affinity 1 off", "remove service 10.96.1.1:80/TCP"],
        "off before the frontend and its id go"
    );

    // A restart: the cluster dropped `old`'s affinity while no agent ran.
    let old = service_yaml("old", "10.96.1.9", &[80], 2);
    apply(&mut reconciler, &translation(&with_affinity(&old, 60)));
    let maps = reconciler.into_maps();
    assert_eq!(maps.affinity.len(), 1);
    let mut second = Reconciler::adopt(maps).unwrap();
    apply(&mut second, &translation(&old));
    second.prune(false).unwrap();
    assert!(
        second.maps().affinity.is_empty(),
        "{:?}",
        second.maps().affinity
    );
}

/// Affinity across an agent restart on the real, pinned maps: the next
/// agent reads what the previous one wrote (timeouts and match entries),
/// keeps it for the frontend that still asks, and takes it from the one
/// whose manifest dropped it meanwhile.
#[test]
fn affinity_written_by_a_previous_agent_is_kept_or_pruned() {
    common::require_root("pinned maps");
    let pins = common::PinDir::new();
    let pin_dir = pins.path();
    let options = pins.load_options();
    let web = service_yaml("web", "10.96.1.1", &[80], 3);
    let old = service_yaml("old", "10.96.1.9", &[80], 2);
    let hz = datapath_user::clock::hz().unwrap();
    let ids = {
        let mut datapath = datapath_user::Datapath::load(&options).unwrap();
        let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
        apply(&mut reconciler, &translation(&with_affinity(&web, 60)));
        apply(&mut reconciler, &translation(&with_affinity(&old, 30)));
        let affinity = reconciler.maps().affinity.as_ref().unwrap();
        let matched = affinity.matched().unwrap();
        assert_eq!(
            matched.values().map(|ids| ids.len()).collect::<Vec<_>>(),
            [3, 2]
        );
        let ids: Vec<u32> = matched.keys().copied().collect();
        assert_eq!(affinity.timeout(ids[0]).unwrap(), 60 * hz);
        assert_eq!(affinity.timeout(ids[1]).unwrap(), 30 * hz);
        ids
    };
    let maps = datapath_user::DatapathMaps::open_pinned(&pin_dir).unwrap();
    let mut reconciler = Reconciler::adopt(maps).unwrap();
    apply(&mut reconciler, &translation(&with_affinity(&web, 60)));
    apply(&mut reconciler, &translation(&old));
    reconciler.prune(false).unwrap();
    let affinity = reconciler.maps().affinity.as_ref().unwrap();
    assert_eq!(affinity.timeout(ids[0]).unwrap(), 60 * hz, "web keeps it");
    assert_eq!(affinity.timeout(ids[1]).unwrap(), 0, "old lost it");
    let matched = affinity.matched().unwrap();
    assert_eq!(
        matched.keys().copied().collect::<Vec<_>>(),
        [ids[0]],
        "only web's backends are matched"
    );
}

/// The upgrade that adds the affinity maps: pins of the build before them
/// (none of the three pinned or marked) are read by the CLI as they are,
/// and the new agent makes the three and keeps every other map (the
/// tracked connections and every id stay), then gives a frontend
/// affinity.
#[test]
fn an_upgrade_that_adds_the_affinity_maps_keeps_every_other_map() {
    use aya::maps::MapInfo;
    use datapath_common::maps::{AFFINITY_MAP, AFFINITY_MATCH_MAP, AFFINITY_TIMEOUT_MAP, ALL_MAPS};
    use datapath_user::{LoadOptions, map_pins::PinPolicy};
    common::require_root("pinned maps");
    let pins = common::PinDir::new();
    let pin_dir = pins.path();
    let options = LoadOptions {
        pin_dir: Some(pin_dir.clone()),
        pin_policy: PinPolicy::Own,
        ..LoadOptions::default()
    };
    let web = service_yaml("web", "10.96.1.1", &[80], 3);
    let programmed = {
        let mut datapath = datapath_user::Datapath::load(&options).unwrap();
        let mut reconciler = Reconciler::new_on_empty(&mut datapath.maps);
        apply(&mut reconciler, &translation(&web));
        reconciler.prune(false).unwrap();
        reconciler.maps().dump().unwrap()
    };
    let added = [AFFINITY_MAP, AFFINITY_MATCH_MAP, AFFINITY_TIMEOUT_MAP];
    let layouts = pin_dir.join(datapath_user::map_pins::LAYOUTS_DIR);
    for map in added {
        std::fs::remove_file(pin_dir.join(map)).unwrap();
        std::fs::remove_dir(layouts.join(format!("{map}-v1"))).unwrap();
    }
    let older = datapath_user::DatapathMaps::open_pinned(&pin_dir).unwrap();
    assert!(older.affinity.is_none());
    assert_eq!(older.dump().unwrap(), programmed);
    drop(older);
    let map_id = |map: &str| MapInfo::from_pin(pin_dir.join(map)).unwrap().id();
    let others: Vec<&str> = ALL_MAPS
        .into_iter()
        .filter(|m| !added.contains(m))
        .collect();
    let ids: Vec<u32> = others.iter().map(|m| map_id(m)).collect();

    let mut datapath = datapath_user::Datapath::load(&options).unwrap();
    assert_eq!(
        others.iter().map(|m| map_id(m)).collect::<Vec<_>>(),
        ids,
        "every other map kept: {others:?}"
    );
    assert!(added.iter().all(|m| pin_dir.join(m).exists()), "made");
    assert_eq!(datapath.maps.dump().unwrap(), programmed);
    let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
    apply(&mut reconciler, &translation(&with_affinity(&web, 60)));
    let affinity = reconciler.maps().affinity.as_ref().unwrap();
    assert_eq!(affinity.matched().unwrap().len(), 1);
}

/// Whatever affinity write fails, no client is kept on a backend once it
/// is deleted (its id may go to another pod), and a freed reverse-NAT id
/// keeps no affinity: the maps drop a deleted backend's match entries and
/// a removed frontend's timeout themselves; the frontend's affinity is
/// unknown after the failure and written again by the next update.
#[test]
fn a_failed_affinity_write_keeps_no_client_on_a_deleted_backend() {
    let mut reconciler = Reconciler::adopt(FakeMaps::with_capacity(64)).unwrap();
    let three = service_yaml("web", "10.96.1.1", &[80], 3);
    apply(&mut reconciler, &translation(&with_affinity(&three, 60)));
    reconciler.maps_mut().fail_next_affinity = true;
    let two = three.replace("- addresses: [10.244.0.1]\n", "");
    let key = ObjectKey::new("test", "web");
    let outcome = reconciler.update_service(&key, &translation(&with_affinity(&two, 60)).1);
    assert_eq!(outcome.issues.len(), 1, "{:?}", outcome.issues);
    assert!(
        reconciler
            .maps()
            .log
            .contains(&"remove backend 1".to_owned())
    );
    assert_eq!(
        reconciler.maps().affinity[&1],
        (60, vec![2, 3]),
        "the deleted backend is matched no more"
    );
    // The next update writes it, though the manifest is unchanged.
    reconciler.maps_mut().log.clear();
    apply(&mut reconciler, &translation(&with_affinity(&two, 60)));
    assert_eq!(reconciler.maps().log, ["affinity 1 60s [2, 3]"]);
    // A write that fails while asking for affinity, then a manifest
    // without it: the frontend's affinity is taken away (the maps may
    // hold it, whatever the failed write left).
    reconciler.maps_mut().fail_next_affinity = true;
    let outcome = reconciler.update_service(&key, &translation(&with_affinity(&two, 30)).1);
    assert_eq!(outcome.issues.len(), 1, "{:?}", outcome.issues);
    reconciler.maps_mut().log.clear();
    apply(&mut reconciler, &translation(&two));
    assert_eq!(reconciler.maps().log, ["affinity 1 off"]);
    assert!(reconciler.maps().affinity.is_empty());
    apply(&mut reconciler, &translation(&with_affinity(&two, 60)));
    // A removal whose affinity write fails is retried; the id is not
    // freed meanwhile.
    reconciler.maps_mut().fail_next_affinity = true;
    let outcome = reconciler.update_service(&key, &gone("web").1);
    assert_eq!(outcome.issues.len(), 1, "{:?}", outcome.issues);
    assert_eq!(reconciler.ids_in_use().1, 1, "the frontend's id is held");
    apply(&mut reconciler, &gone("web"));
    assert!(reconciler.maps().affinity.is_empty());
    assert_eq!(reconciler.ids_in_use(), (0, 0));
}

/// An agent restart during which a service with affinity lost a backend
/// and its affinity (real, pinned maps), with sources that could not
/// read everything (`prune(true)` keeps what it cannot account for): the
/// first sync writes what the frontend asks now, so the departed
/// backend's match entry and the timeout go with that sync.
#[test]
fn affinity_dropped_while_no_agent_ran_goes_with_the_first_sync() {
    common::require_root("pinned maps");
    let pins = common::PinDir::new();
    let pin_dir = pins.path();
    let options = pins.load_options();
    let three = service_yaml("web", "10.96.1.1", &[80], 3);
    {
        let mut datapath = datapath_user::Datapath::load(&options).unwrap();
        let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
        apply(&mut reconciler, &translation(&with_affinity(&three, 60)));
    }
    let maps = datapath_user::DatapathMaps::open_pinned(&pin_dir).unwrap();
    let mut reconciler = Reconciler::adopt(maps).unwrap();
    let two = three.replace("- addresses: [10.244.0.1]\n", "");
    apply(&mut reconciler, &translation(&two));
    let affinity = reconciler.maps().affinity.as_ref().unwrap();
    assert!(affinity.matched().unwrap().is_empty(), "before the prune");
    assert_eq!(affinity.timeout(1).unwrap(), 0, "before the prune");
    reconciler.prune(true).unwrap();
    let affinity = reconciler.maps().affinity.as_ref().unwrap();
    assert!(affinity.matched().unwrap().is_empty());
    assert_eq!(affinity.timeout(1).unwrap(), 0);
}

/// A backend delete that fails keeps the id out of use (a match entry may
/// still keep clients on it) until a retry at the next update works.
#[test]
fn a_backend_whose_delete_failed_is_not_handed_out_again() {
    let mut reconciler = Reconciler::adopt(FakeMaps::with_capacity(64)).unwrap();
    let three = service_yaml("web", "10.96.1.1", &[80], 3);
    apply(&mut reconciler, &translation(&with_affinity(&three, 60)));
    reconciler.maps_mut().fail_next_remove_backend = true;
    let two = three.replace("- addresses: [10.244.0.1]\n", "");
    apply(&mut reconciler, &translation(&with_affinity(&two, 60)));
    assert_eq!(reconciler.ids_in_use().0, 3, "id 1 still held");
    // Another service's new backend does not get id 1 meanwhile.
    reconciler.maps_mut().log.clear();
    apply(
        &mut reconciler,
        &translation(&service_yaml("api", "10.96.1.2", &[80], 1)),
    );
    assert!(
        reconciler
            .maps()
            .log
            .contains(&"remove backend 1".to_owned()),
        "retried: {:?}",
        reconciler.maps().log
    );
    let dump = reconciler.maps().dump().unwrap();
    assert_eq!(
        backend_id(&dump, "10.244.0.1"),
        Some(4),
        "a fresh id, not 1"
    );
}

/// Counts of ids no frontend holds are zeroed at adoption, before the
/// first sync may hand such an id out; those of frontends that went
/// while no agent ran, when the first sync's prune removes them (the next
/// frontend to get the id starts at zero); the counts of frontends still
/// asked for are kept.
#[test]
fn service_counters_of_frontends_gone_while_no_agent_ran_are_zeroed_by_the_prune() {
    use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
    use datapath_common::maps::{SERVICE_COUNTERS_MAP, ServiceCounters};
    common::require_root("pinned maps");
    let pins = common::PinDir::new();
    let pin_dir = pins.path();
    let options = pins.load_options();
    let web = service_yaml("web", "10.96.1.1", &[80], 2);
    let api = service_yaml("api", "10.96.1.2", &[80], 2);
    {
        let mut datapath = datapath_user::Datapath::load(&options).unwrap();
        let mut reconciler = Reconciler::adopt(&mut datapath.maps).unwrap();
        apply(&mut reconciler, &translation(&web));
        apply(&mut reconciler, &translation(&api));
    }
    let counted = |id: u32, packets: u64| {
        let data = MapData::from_pin(pin_dir.join(SERVICE_COUNTERS_MAP)).unwrap();
        let mut map: PerCpuArray<_, ServiceCounters> =
            PerCpuArray::try_from(Map::PerCpuArray(data)).unwrap();
        let cpus = aya::util::nr_cpus().unwrap();
        let value = ServiceCounters {
            packets,
            new_flows: 1,
        };
        map.set(id, PerCpuValues::try_from(vec![value; cpus]).unwrap(), 0)
            .unwrap();
    };
    let maps = datapath_user::DatapathMaps::open_pinned(&pin_dir).unwrap();
    let ids: std::collections::BTreeMap<String, u32> = maps
        .dump()
        .unwrap()
        .frontends
        .iter()
        .map(|f| (f.frontend.address.to_string(), f.rev_nat_id))
        .collect();
    let (web_id, api_id) = (ids["10.96.1.1"], ids["10.96.1.2"]);
    counted(web_id, 5);
    counted(api_id, 7);
    // A stray count (an id no frontend ever held here).
    counted(40, 9);
    let figures = |reconciler: &Reconciler<datapath_user::DatapathMaps>| {
        let counters = reconciler.maps().service_counters.as_ref().unwrap();
        let cpus = aya::util::nr_cpus().unwrap() as u64;
        counters
            .nonzero()
            .unwrap()
            .into_iter()
            .map(|(id, c)| (id, c.packets / cpus))
            .collect::<std::collections::BTreeMap<u32, u64>>()
    };
    // A new agent: only web is asked for.
    let mut reconciler = Reconciler::adopt(maps).unwrap();
    apply(&mut reconciler, &translation(&web));
    assert_eq!(
        figures(&reconciler),
        [(web_id, 5), (api_id, 7)].into(),
        "adoption zeroed the id no frontend holds (the sync could hand it out)"
    );
    reconciler.prune(false).unwrap();
    assert_eq!(figures(&reconciler), [(web_id, 5)].into());
}

/// A NodePort service `name` (ClusterIP `ip`, nodePort 30080) with
/// `externalTrafficPolicy: policy` over ready `endpoints` (address, node).
fn node_port_yaml(name: &str, ip: &str, policy: &str, endpoints: &[(&str, &str)]) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  type: NodePort\n  clusterIP: {ip}\n  externalTrafficPolicy: {policy}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: 30080}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: test\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080}}\nendpoints:\n"
    );
    for (address, node) in endpoints {
        text += &format!("- {{addresses: [{address}], nodeName: {node}}}\n");
    }
    text
}

#[test]
fn frontends_served_from_outside_share_a_maglev_table_rebuilt_when_their_backends_change() {
    use datapath_user::maps::MaglevSettings;
    const SIZE: u32 = datapath_common::maglev::MIN_TABLE_SIZE;
    let mut maps = FakeMaps::with_capacity(64);
    maps.maglev = MaglevSettings {
        tables: 2,
        table_size: SIZE,
        seed: 7,
    };
    let node = NodeContext {
        node_name: Some("node-1".into()),
        // Two node addresses: two nodePort frontends, one backend set.
        addresses: vec![
            "192.168.7.1".parse().unwrap(),
            "192.168.7.2".parse().unwrap(),
        ],
        ..NodeContext::default()
    };
    let endpoints = [("10.244.0.1", "node-1"), ("10.244.0.2", "node-2")];
    let mut reconciler = Reconciler::new_on_empty(maps);
    let cluster = translation_on(
        &node_port_yaml("shop", "10.96.5.1", "Cluster", &endpoints),
        &node,
    );
    apply(&mut reconciler, &cluster);
    let id_of = |maps: &FakeMaps, address: &str| -> u32 {
        let address: Ipv4Addr = address.parse().unwrap();
        *maps
            .v4
            .backends
            .iter()
            .find(|(_, b)| b.address == address)
            .unwrap()
            .0
    };
    let node_port_ids = |maps: &FakeMaps| -> Vec<u32> {
        maps.v4
            .services
            .iter()
            .filter(|(f, _)| f.port == 30080)
            .map(|(_, (id, _))| *id)
            .collect()
    };
    let maps = reconciler.maps();
    let ids = node_port_ids(maps);
    assert_eq!(ids.len(), 2);
    assert_eq!(
        maps.maglev_table_of
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect::<Vec<_>>(),
        [(ids[0], 0), (ids[1], 0)],
        "both nodePort frontends share table 0; the ClusterIP has none"
    );
    let table = &maps.maglev_tables[&0];
    let (e1, e2) = (id_of(maps, "10.244.0.1"), id_of(maps, "10.244.0.2"));
    let share = |id| table.iter().filter(|&&b| b == id).count();
    assert_eq!(share(e1) + share(e2), SIZE as usize);
    assert!(share(e1).abs_diff(share(e2)) <= 1, "Maglev's balance");

    // Local: this node's endpoint only, in a table of its own, written
    // before the frontends point at it.
    let local = translation_on(
        &node_port_yaml("shop", "10.96.5.1", "Local", &endpoints),
        &node,
    );
    let log_from = reconciler.maps().log.len();
    apply(&mut reconciler, &local);
    let maps = reconciler.maps();
    assert!(maps.maglev_table_of.values().all(|&t| t == 1));
    assert!(maps.maglev_tables[&1].iter().all(|&b| b == e1));
    let log = &maps.log[log_from..];
    let written = log
        .iter()
        .position(|l| l == "maglev table 1")
        .expect("written");
    let pointed = log
        .iter()
        .position(|l| l.ends_with("Some(1)"))
        .expect("pointed");
    assert!(written < pointed, "make before point: {log:?}");

    // A table write that fails leaves the frontends to the stack (never
    // on a table naming backends that may be released), said; the next
    // update serves them again.
    reconciler.maps_mut().fail_next_maglev_write = true;
    let outcome = reconciler.update_service(&cluster.0, &cluster.1);
    assert_eq!(outcome.issues.len(), 1, "{:?}", outcome.issues);
    assert_eq!(outcome.issues[0].kind, IssueKind::Datapath);
    assert_eq!(
        reconciler.maps().maglev_table_of.len(),
        1,
        "the frontend whose table was not written is left to the stack"
    );
    apply(&mut reconciler, &local);
    let maps = reconciler.maps();
    assert_eq!(maps.maglev_table_of.len(), 2, "both served again");
    let tables: std::collections::BTreeSet<u32> = maps.maglev_table_of.values().copied().collect();
    assert_eq!(tables.len(), 1, "sharing one table");
    let table = tables.into_iter().next().unwrap();
    assert!(maps.maglev_tables[&table].iter().all(|&b| b == e1));

    // A second service with another set takes table 0 (freed), a third
    // finds none: said, and still served to pods.
    let other = translation_on(
        &node_port_yaml("cart", "10.96.5.2", "Cluster", &[("10.244.0.3", "node-1")]),
        &NodeContext {
            addresses: vec!["192.168.7.1".parse().unwrap()],
            ..node.clone()
        },
    );
    let other = (other.0, {
        let mut t = other.1;
        for f in &mut t.frontends {
            if f.frontend.port == 30080 {
                f.frontend.port = 30081;
            }
        }
        t
    });
    apply(&mut reconciler, &other);
    let third = translation_on(
        &node_port_yaml("till", "10.96.5.3", "Cluster", &[("10.244.0.4", "node-1")]),
        &NodeContext {
            addresses: vec!["192.168.7.9".parse().unwrap()],
            ..node.clone()
        },
    );
    let outcome = reconciler.update_service(&third.0, &third.1);
    assert_eq!(outcome.issues.len(), 1, "{:?}", outcome.issues);
    assert_eq!(outcome.issues[0].kind, IssueKind::Limit);
    assert!(
        outcome.issues[0].reason.contains("--maglev-tables"),
        "{}",
        outcome.issues[0]
    );
    assert!(
        reconciler
            .maps()
            .v4
            .services
            .keys()
            .any(|f| f.address == "10.96.5.3".parse::<Ipv4Addr>().unwrap()),
        "its ClusterIP is served all the same"
    );
    assert_eq!(reconciler.maglev_tables_in_use(), (2, 2));

    // A node without a local endpoint does not serve it from outside.
    apply(
        &mut reconciler,
        &translation_on(
            &node_port_yaml("shop", "10.96.5.1", "Local", &[("10.244.0.2", "node-2")]),
            &node,
        ),
    );
    let ids = node_port_ids(reconciler.maps());
    assert!(
        ids.iter()
            .all(|id| !reconciler.maps().maglev_table_of.contains_key(id))
    );

    // Restarted: the frontends keep the tables (read back with the sets
    // they were built for); nothing is rewritten.
    apply(&mut reconciler, &gone("till"));
    apply(&mut reconciler, &cluster);
    let before = reconciler.maps().maglev_table_of.clone();
    assert_eq!(before.len(), 3, "shop's two nodePort frontends and cart's");
    let mut reconciler = Reconciler::adopt(reconciler.into_maps()).unwrap();
    let log_from = reconciler.maps().log.len();
    apply(&mut reconciler, &cluster);
    apply(&mut reconciler, &other);
    assert_eq!(reconciler.maps().maglev_table_of, before);
    assert!(
        reconciler.maps().log[log_from..]
            .iter()
            .all(|l| !l.starts_with("maglev")),
        "{:?}",
        &reconciler.maps().log[log_from..]
    );
    // A table built with other settings (its ids not this node's
    // backends) is let go at adoption: rebuilt by the first sync.
    let mut maps = reconciler.into_maps();
    let shop_table = before[&node_port_ids(&maps)[0]];
    maps.maglev_tables.get_mut(&shop_table).unwrap()[0] = 999;
    let mut reconciler = Reconciler::adopt(maps).unwrap();
    assert_eq!(
        reconciler.maps().maglev_table_of.len(),
        1,
        "only cart's kept"
    );
    apply(&mut reconciler, &cluster);
    apply(&mut reconciler, &other);
    assert_eq!(reconciler.maps().maglev_table_of.len(), 3);
    let table = &reconciler.maps().maglev_tables
        [&reconciler.maps().maglev_table_of[&node_port_ids(reconciler.maps())[0]]];
    assert!(!table.contains(&999), "rebuilt");
    reconciler.prune(false).unwrap();
    apply(&mut reconciler, &gone("shop"));
    apply(&mut reconciler, &gone("cart"));
    assert!(reconciler.maps().maglev_table_of.is_empty());
    assert_eq!(reconciler.maglev_tables_in_use().0, 0);
}

#[test]
fn with_every_maglev_table_in_use_a_frontends_own_table_is_rewritten_in_place() {
    use datapath_user::maps::MaglevSettings;
    const SIZE: u32 = datapath_common::maglev::MIN_TABLE_SIZE;
    let mut maps = FakeMaps::with_capacity(64);
    maps.maglev = MaglevSettings {
        tables: 1,
        table_size: SIZE,
        seed: 7,
    };
    // One node address: one nodePort frontend, the table's sole user.
    let node = NodeContext {
        node_name: Some("node-1".into()),
        addresses: vec!["192.168.7.1".parse().unwrap()],
        ..NodeContext::default()
    };
    let endpoints = [("10.244.0.1", "node-1"), ("10.244.0.2", "node-2")];
    let cluster = translation_on(
        &node_port_yaml("shop", "10.96.5.1", "Cluster", &endpoints),
        &node,
    );
    let local = translation_on(
        &node_port_yaml("shop", "10.96.5.1", "Local", &endpoints),
        &node,
    );
    let mut reconciler = Reconciler::new_on_empty(maps);
    apply(&mut reconciler, &cluster);
    let local_id = |maps: &FakeMaps| -> u32 {
        *maps
            .v4
            .backends
            .iter()
            .find(|(_, b)| b.address == "10.244.0.1".parse::<Ipv4Addr>().unwrap())
            .unwrap()
            .0
    };
    apply(&mut reconciler, &local);
    let maps = reconciler.maps();
    assert_eq!(
        maps.maglev_table_of.values().copied().collect::<Vec<_>>(),
        [0]
    );
    assert!(
        maps.maglev_tables[&0].iter().all(|&b| b == local_id(maps)),
        "rewritten in place"
    );
    // An in-place write that fails: half written, the frontend is left
    // to the stack; the next update serves it again.
    reconciler.maps_mut().fail_next_maglev_write = true;
    let outcome = reconciler.update_service(&cluster.0, &cluster.1);
    assert_eq!(outcome.issues.len(), 1, "{:?}", outcome.issues);
    assert!(reconciler.maps().maglev_table_of.is_empty(), "unpointed");
    apply(&mut reconciler, &cluster);
    let maps = reconciler.maps();
    assert_eq!(
        maps.maglev_table_of.values().copied().collect::<Vec<_>>(),
        [0]
    );
    assert_eq!(
        maps.maglev_tables[&0]
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        2,
        "both backends again"
    );
    assert_eq!(reconciler.maglev_tables_in_use(), (1, 1));
}
