//! Desired objects, per mode and option, with snapshots of the rendered YAML.

use fulcrum::api::{LoadBalancedApp, LoadBalancedAppSpec};
use fulcrum::operator::desired::{APP_LABEL, PROXY_CONTAINER, Settings, TRACK_LABEL, desired};
use fulcrum::operator::render::{ADMIN_PORT, PROXY_PORT, proxy_config};
use fulcrum::proxy::config::ProxyConfig;
use serde_json::{Value, json};

fn app(spec: Value) -> LoadBalancedApp {
    let mut base = json!({
        "port": 8080,
        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "web:1", "ports": [{"containerPort": 8080}]}]}},
    });
    json_patch::merge(&mut base, &spec);
    let spec: LoadBalancedAppSpec = serde_json::from_value(base).unwrap();
    let mut lba = LoadBalancedApp::new("web", spec);
    lba.metadata.namespace = Some("shop".into());
    lba.metadata.uid = Some("4c7e0c1e-0000-4000-8000-000000000001".into());
    lba
}

fn settings() -> Settings {
    Settings { proxy_image: "ghcr.io/fulcrum-dev/fulcrum:0.1.0".into() }
}

fn yaml(objects: &[Value]) -> String {
    objects.iter().map(|o| serde_saphyr::to_string(o).unwrap()).collect::<Vec<_>>().join("---\n")
}

#[test]
fn sidecar_mode_injects_the_proxy_and_binds_the_apps_service_account() {
    let d = desired(&app(json!({})), &settings()).unwrap();
    let pod = d.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["web"]);
    // A native sidecar: started before the app, stopped after it.
    let init = pod.init_containers.as_ref().unwrap();
    assert_eq!(init.len(), 1);
    let proxy = &init[0];
    assert_eq!(proxy.name, PROXY_CONTAINER);
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    let sc = proxy.security_context.as_ref().unwrap();
    assert_eq!(
        (sc.run_as_non_root, sc.read_only_root_filesystem, sc.allow_privilege_escalation),
        (Some(true), Some(true), Some(false))
    );
    assert_eq!(sc.capabilities.as_ref().unwrap().drop, Some(vec!["ALL".to_string()]));
    assert!(proxy.readiness_probe.is_some() && proxy.liveness_probe.is_some());
    assert!(d.proxy_deployment.is_none() && d.proxy_pdb.is_none());
    // Pods without an account of their own get the app's, not the namespace's `default`...
    assert_eq!(pod.service_account_name.as_deref(), Some("web-proxy"));
    // ...and no token of it in the app's containers: the proxy has its own.
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_proxy_has_its_own_token(pod, proxy);
    assert_eq!(d.service_account.as_ref().unwrap().metadata.name.as_deref(), Some("web-proxy"));
    assert_eq!(d.role_binding.subjects.as_ref().unwrap()[0].name, "web-proxy");
    // The front Service reaches the sidecars on every app pod.
    let front = d.front.spec.as_ref().unwrap();
    assert_eq!(front.selector.as_ref().unwrap().get(APP_LABEL).map(String::as_str), Some("web"));
    assert!(!front.selector.as_ref().unwrap().contains_key(TRACK_LABEL));
}

/// The proxy container mounts a projected token, CA and namespace where
/// in-cluster clients look for them.
fn assert_proxy_has_its_own_token(
    pod: &k8s_openapi::api::core::v1::PodSpec,
    proxy: &k8s_openapi::api::core::v1::Container,
) {
    let mount = proxy.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "fulcrum-proxy-token").unwrap();
    assert_eq!(mount.mount_path, "/var/run/secrets/kubernetes.io/serviceaccount");
    assert_eq!(mount.read_only, Some(true));
    let volume = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == "fulcrum-proxy-token").unwrap();
    let sources = volume.projected.as_ref().unwrap().sources.as_ref().unwrap();
    assert!(sources.iter().any(|s| s.service_account_token.as_ref().is_some_and(|t| t.path == "token")));
    assert!(sources.iter().any(|s| s.config_map.as_ref().is_some_and(|c| c.name == "kube-root-ca.crt")));
    assert!(sources.iter().any(|s| s.downward_api.is_some()));
}

#[test]
fn a_pod_that_turns_off_token_automounting_still_gives_the_proxy_credentials() {
    let template = |automount: Value| {
        json!({"template": {"spec": {"serviceAccountName": "shop-web", "automountServiceAccountToken": automount,
            "containers": [{"name": "web", "image": "web:1"}]}}})
    };
    let d = desired(&app(template(json!(false))), &settings()).unwrap();
    let pod = d.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false), "the app's choice is kept");
    assert_proxy_has_its_own_token(pod, &pod.init_containers.as_ref().unwrap()[0]);
    // An app that names its account and says nothing keeps its automounted token.
    let d = desired(&app(template(Value::Null)), &settings()).unwrap();
    let pod = d.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.automount_service_account_token, None);
}

#[test]
fn owned_objects_do_not_block_their_owners_deletion() {
    let canary = json!({"weight": 5, "template": {"spec": {"containers": [{"name": "web", "image": "web:2"}]}}});
    let d = desired(&app(json!({"proxy": {"mode": "Dedicated"}, "canary": canary})), &settings()).unwrap();
    for o in d.objects() {
        let refs = o["metadata"]["ownerReferences"].as_array().unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0]["controller"], true);
        assert!(refs[0].get("blockOwnerDeletion").is_none(), "{o}");
    }
}

#[test]
fn disruption_budgets_never_block_a_drain_on_unhealthy_pods_or_a_single_proxy() {
    let d = desired(&app(json!({"replicas": 3, "proxy": {"mode": "Dedicated", "replicas": 1}})), &settings()).unwrap();
    let app_pdb = d.pdb.spec.as_ref().unwrap();
    assert_eq!(app_pdb.unhealthy_pod_eviction_policy.as_deref(), Some("AlwaysAllow"));
    let proxy_pdb = d.proxy_pdb.as_ref().unwrap().spec.as_ref().unwrap();
    assert_eq!(proxy_pdb.unhealthy_pod_eviction_policy.as_deref(), Some("AlwaysAllow"));
    assert_eq!(serde_json::to_value(&proxy_pdb.max_unavailable).unwrap(), json!(1), "one replica can be drained");
    assert!(proxy_pdb.min_available.is_none());
}

#[test]
fn sidecar_pods_keep_the_accounts_they_name_and_the_proxy_role_binds_each() {
    let template =
        |sa: &str| json!({"spec": {"serviceAccountName": sa, "containers": [{"name": "web", "image": "web:1"}]}});
    let d = desired(
        &app(json!({"template": template("shop-web"), "canary": {"weight": 5, "template": template("shop-web-next")}})),
        &settings(),
    )
    .unwrap();
    let sa = |dep: &k8s_openapi::api::apps::v1::Deployment| {
        dep.spec.as_ref().unwrap().template.spec.as_ref().unwrap().service_account_name.clone()
    };
    assert_eq!(sa(&d.deployment).as_deref(), Some("shop-web"));
    assert_eq!(sa(d.canary_deployment.as_ref().unwrap()).as_deref(), Some("shop-web-next"));
    assert!(d.service_account.is_none(), "no account of the app's own is needed");
    let subjects: Vec<&str> = d.role_binding.subjects.as_ref().unwrap().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(subjects, ["shop-web", "shop-web-next"]);
}

#[test]
fn dedicated_mode_runs_a_spread_proxy_deployment_with_its_own_account_and_budget() {
    let d = desired(&app(json!({"proxy": {"mode": "Dedicated", "replicas": 3}})), &settings()).unwrap();
    let pod = d.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1, "no sidecar in Dedicated mode");
    let proxy = d.proxy_deployment.as_ref().unwrap();
    let spec = proxy.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("web-proxy"));
    assert!(pod.topology_spread_constraints.is_some());
    assert_eq!(d.service_account.as_ref().unwrap().metadata.name.as_deref(), Some("web-proxy"));
    assert_eq!(d.role_binding.subjects.as_ref().unwrap()[0].name, "web-proxy");
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_proxy_has_its_own_token(pod, &pod.containers[0]);
}

#[test]
fn every_owned_object_has_the_controller_reference_and_the_namespace() {
    let d = desired(&app(json!({"canary": {"weight": 10, "template": {"spec": {"containers": [{"name": "web", "image": "web:2"}]}}}})), &settings()).unwrap();
    for o in d.objects() {
        assert_eq!(o["metadata"]["namespace"], "shop", "{o}");
        let owner = &o["metadata"]["ownerReferences"][0];
        assert_eq!(
            (owner["kind"].as_str(), owner["name"].as_str(), owner["controller"].as_bool()),
            (Some("LoadBalancedApp"), Some("web"), Some(true))
        );
    }
    // ServiceAccount, Role, RoleBinding, ConfigMap, two backends Services, front Service, two Deployments, PDB.
    assert_eq!(d.objects().len(), 10);
}

#[test]
fn the_role_grants_only_watches_of_endpointslices_and_the_proxy_configmap() {
    let d = desired(&app(json!({})), &settings()).unwrap();
    let rules = serde_json::to_value(d.role.rules.as_ref().unwrap()).unwrap();
    assert_eq!(
        rules,
        json!([
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["web-proxy"], "verbs": ["list", "watch"]},
        ])
    );
}

#[test]
fn a_canary_gets_its_deployment_backends_and_traffic_split() {
    let d = desired(
        &app(json!({"canary": {"replicas": 2, "weight": 10, "template": {"spec": {"containers": [{"name": "web", "image": "web:2"}]}}}})),
        &settings(),
    )
    .unwrap();
    let canary = d.canary_deployment.as_ref().unwrap();
    assert_eq!(canary.metadata.name.as_deref(), Some("web-canary"));
    let labels = canary.spec.as_ref().unwrap().selector.match_labels.as_ref().unwrap();
    assert_eq!(labels.get(TRACK_LABEL).map(String::as_str), Some("canary"));
    assert_eq!(d.canary_backends.as_ref().unwrap().metadata.name.as_deref(), Some("web-canary-backends"));
    let config = ProxyConfig::parse(&d.proxy_config.data.as_ref().unwrap()["proxy.yaml"]).unwrap();
    assert_eq!(config.load_balancing.tracks, [("canary".to_string(), 10), ("stable".to_string(), 90)].into());
}

#[test]
fn a_canary_sized_by_percentage_follows_the_stable_replicas() {
    let template = json!({"spec": {"containers": [{"name": "web", "image": "web:2"}]}});
    let canary_replicas = |replicas: i32, canary: serde_json::Value| {
        let mut canary = canary;
        canary["weight"] = json!(10);
        canary["template"] = template.clone();
        let d = desired(&app(json!({"replicas": replicas, "canary": canary})), &settings()).unwrap();
        d.canary_deployment.unwrap().spec.unwrap().replicas.unwrap()
    };
    assert_eq!(canary_replicas(10, json!({"replicasPercent": 20})), 2);
    assert_eq!(canary_replicas(11, json!({"replicasPercent": 20})), 3, "rounded up");
    assert_eq!(canary_replicas(1, json!({"replicasPercent": 1})), 1, "at least one beside a stable replica");
    assert_eq!(canary_replicas(0, json!({"replicasPercent": 50})), 0, "none when the app is scaled to zero");
    assert_eq!(canary_replicas(10, json!({})), 1, "one by default");
    assert_eq!(canary_replicas(10, json!({"replicas": 4})), 4);
}

#[test]
fn the_rendered_proxy_config_follows_the_spec_and_parses_back() {
    let spec = app(json!({
        "loadBalancing": {"algorithm": "ConsistentHash", "hashOn": {"cookie": "user"}, "slowStart": "30s"},
        "healthCheck": {"active": {"http": {"path": "/ready"}, "interval": "5s"}},
        "retries": {"attempts": 1},
        "timeouts": {"request": "10s"},
    }))
    .spec;
    let config = proxy_config(&spec, None).unwrap();
    let text = config.to_yaml();
    let parsed = ProxyConfig::parse(&text).unwrap();
    assert_eq!(parsed, config);
    assert_eq!(config.listen.port(), PROXY_PORT);
    assert_eq!(config.admin.unwrap().port(), ADMIN_PORT);
    assert_eq!(config.load_balancing.algorithm.name(), "ConsistentHash");
    assert_eq!(config.load_balancing.hash_on.as_ref().unwrap().cookie.as_deref(), Some("user"));
    assert_eq!(config.load_balancing.slow_start.unwrap().0.as_secs(), 30);
    assert_eq!(config.health_check.active.as_ref().unwrap().interval.0.as_secs(), 5);
    assert_eq!(config.retries.attempts, 1);
    assert_eq!(config.timeouts.request.0.as_secs(), 10);
    assert!(config.endpoints.is_empty(), "endpoints are discovered");
}

#[test]
fn a_spec_the_schema_admits_but_cannot_work_is_refused_with_a_reason() {
    // Zero-length durations pass the pattern but no timer can use them.
    let e = desired(&app(json!({"timeouts": {"connect": "0s"}})), &settings()).unwrap_err();
    assert!(e.0.contains("timeouts.connect"), "{e}");
    let e = desired(
        &app(json!({"template": {"spec": {"containers": [{"name": "fulcrum-proxy", "image": "x"}]}}})),
        &settings(),
    )
    .unwrap_err();
    assert!(e.0.contains("reserved"), "{e}");
    let reserved = [
        ("initContainers", json!({"name": "fulcrum-proxy", "image": "x"})),
        ("volumes", json!({"name": "fulcrum-proxy-token", "emptyDir": {}})),
    ];
    for (list, item) in reserved {
        let spec = json!({"template": {"spec": {list: [item], "containers": [{"name": "web", "image": "x"}]}}});
        let e = desired(&app(spec), &settings()).unwrap_err();
        assert!(e.0.contains("reserved") && e.0.contains(list), "{e}");
    }
    let mut no_uid = app(json!({}));
    no_uid.metadata.uid = None;
    assert!(desired(&no_uid, &settings()).is_err());
}

#[test]
fn min_available_defaults_to_one_below_replicas() {
    let d = desired(&app(json!({"replicas": 4})), &settings()).unwrap();
    let pdb = d.pdb.spec.as_ref().unwrap();
    assert_eq!(serde_json::to_value(&pdb.min_available).unwrap(), json!(3));
    let d = desired(&app(json!({"replicas": 4, "availability": {"minAvailable": 2}})), &settings()).unwrap();
    assert_eq!(serde_json::to_value(&d.pdb.spec.as_ref().unwrap().min_available).unwrap(), json!(2));
}

#[test]
fn snapshot_sidecar_minimal() {
    let d = desired(&app(json!({})), &settings()).unwrap();
    insta::assert_snapshot!(yaml(&d.objects()));
}

#[test]
fn snapshot_dedicated_with_canary_and_options() {
    let d = desired(
        &app(json!({
            "replicas": 3,
            "service": {"type": "LoadBalancer", "port": 443, "annotations": {"example.com/lb": "internal"}},
            "proxy": {"mode": "Dedicated"},
            "loadBalancing": {"algorithm": "PeakEwma", "sessionAffinity": {}},
            "canary": {"replicas": 1, "weight": 5, "template": {"spec": {"containers": [{"name": "web", "image": "web:2"}]}}},
            "availability": {"spreadAcrossNodes": false},
        })),
        &settings(),
    )
    .unwrap();
    insta::assert_snapshot!(yaml(&d.objects()));
}

/// The proxy container (sidecar or dedicated) and its pod's volumes, in `objects`.
fn proxy_pod(objects: &[Value], deployment: &str) -> (Value, Vec<Value>) {
    let d =
        objects.iter().find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == deployment).expect("Deployment");
    let spec = &d["spec"]["template"]["spec"];
    let proxy = ["containers", "initContainers"]
        .iter()
        .flat_map(|l| spec[*l].as_array().cloned().unwrap_or_default())
        .find(|c| c["name"] == PROXY_CONTAINER)
        .expect("the proxy container");
    (proxy, spec["volumes"].as_array().cloned().unwrap_or_default())
}

#[test]
fn tls_secrets_are_mounted_whole_and_read_only_and_their_paths_rendered() {
    let tls = json!({
        "tls": {"secretName": "web-tls", "sniSecretNames": ["api-tls"], "minVersion": "1.3", "clientAuth": {"caSecretName": "clients-ca"}},
        "endpointTls": {"caConfigMapName": "kube-root-ca.crt", "serverName": "web.shop.svc", "clientCertificateSecretName": "proxy-client"},
        "loadBalancing": {"algorithm": "ConsistentHash", "hashOn": {"clientCertificate": true}},
    });
    for (mode, deployment) in [("Sidecar", "web"), ("Dedicated", "web-proxy")] {
        let mut spec = tls.clone();
        spec["proxy"] = json!({"mode": mode});
        let d = desired(&app(spec), &settings()).unwrap();
        let objects = d.objects();
        let (proxy, volumes) = proxy_pod(&objects, deployment);
        let secrets: Vec<(&str, &str)> = volumes
            .iter()
            .filter_map(|v| {
                Some((v["name"].as_str()?, v["secret"]["secretName"].as_str().or(v["configMap"]["name"].as_str())?))
            })
            .collect();
        assert_eq!(
            secrets,
            [
                ("fulcrum-tls-0", "web-tls"),
                ("fulcrum-tls-1", "api-tls"),
                ("fulcrum-tls-client-ca", "clients-ca"),
                ("fulcrum-endpoint-ca", "kube-root-ca.crt"),
                ("fulcrum-endpoint-client", "proxy-client"),
            ],
            "{mode}"
        );
        let mounts = proxy["volumeMounts"].as_array().unwrap();
        assert!(mounts.iter().all(|m| m["readOnly"] == true && m.get("subPath").is_none()), "{mode}: {mounts:?}");
        let at = |name: &str| {
            mounts
                .iter()
                .find(|m| m["name"] == name)
                .and_then(|m| m["mountPath"].as_str())
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(at("fulcrum-tls-1"), "/etc/fulcrum/tls/1");
        assert_eq!(at("fulcrum-endpoint-client"), "/etc/fulcrum/endpoint-tls/client");
        // The app's own containers get none of them.
        let d = objects.iter().find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "web").unwrap();
        for c in d["spec"]["template"]["spec"]["containers"].as_array().unwrap() {
            assert!(
                c["volumeMounts"]
                    .as_array()
                    .is_none_or(|m| m.iter().all(|m| !m["name"].as_str().unwrap_or_default().starts_with("fulcrum-")))
            );
        }
    }
    let config = proxy_config(&app(tls).spec, None).unwrap();
    let t = config.tls.as_ref().unwrap();
    let files: Vec<String> = t.certificates.iter().map(|c| c.cert_file.display().to_string()).collect();
    assert_eq!(files, ["/etc/fulcrum/tls/0/tls.crt", "/etc/fulcrum/tls/1/tls.crt"]);
    assert_eq!(t.client_auth.as_ref().unwrap().ca_file.display().to_string(), "/etc/fulcrum/tls/client-ca/ca.crt");
    let e = config.endpoint_tls.as_ref().unwrap();
    assert_eq!(e.ca_file.as_ref().unwrap().display().to_string(), "/etc/fulcrum/endpoint-tls/ca/ca.crt");
    assert_eq!(e.key_file.as_ref().unwrap().display().to_string(), "/etc/fulcrum/endpoint-tls/client/tls.key");
    assert_eq!(ProxyConfig::parse(&config.to_yaml()).unwrap(), config, "parses back");
}

#[test]
fn a_template_volume_with_a_name_the_proxy_uses_is_refused() {
    let spec = json!({
        "tls": {"secretName": "web-tls"},
        "template": {"spec": {"volumes": [{"name": "fulcrum-tls-0", "emptyDir": {}}], "containers": [{"name": "web", "image": "web:1"}]}},
    });
    let e = desired(&app(spec), &settings()).unwrap_err();
    assert!(e.to_string().contains("\"fulcrum-tls-0\" is reserved for the proxy"), "{e}");
}
