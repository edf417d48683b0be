//! Golden scenarios: Kubernetes YAML in, the maps out as the CLI prints them (Cilium's
//! `pkg/loadbalancer/tests/testdata/*.txtar` are the model).
//!
//! Each directory under `tests/scenarios/` is one case of Service semantics:
//! - `objects.yaml`: the Services, EndpointSlices, Nodes and ServiceCIDRs, read by the agent's manifest reader;
//! - `agent.yaml`: the agent's settings in the `--config` file format (keys are `lb-agent run`'s long flags), read
//!   through the real command line (`cli::run_config`); it must set `node-name`, and `node-address` unless the
//!   objects hold this node's Node (the host's addresses would make the output depend on the machine);
//! - `expected.txt`: what the maps hold afterwards, printed by the CLI's own views: `lb-agent services`,
//!   `backends`, `maglev` for every service, then the node-level maps, the objects the agent skipped (as it logs
//!   them) and the frontends it could not program.
//!
//! The objects go through what `lb-agent run` does in one sync (`agent::syncer`): the model's `Translator`, the
//! `Reconciler` writing the fake maps, the `NameWriter` writing the names map. Nothing of the output is written by
//! this test: a change in the translation, the reconciler or the views shows up as a diff.
//!
//! **Regenerating:** `LB_UPDATE_GOLDEN=1 cargo test -p lb-agent --test scenarios` rewrites every `expected.txt`
//! from what the code now does; review the diff (`git diff lb-agent/tests/scenarios`) before committing it.
//! Without the variable a difference fails the test with both texts.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use lb_agent::datapath::inspect;
use lb_agent::datapath::listings;
use lb_agent::datapath::maps::{FakeMaps, MapsRead};
use lb_agent::datapath::names::{FakeNames, NameStore, NameWriter};
use lb_agent::datapath::reconcile::{Reconciler, service_key};
use lb_agent::model::{self, Translator};
use lb_agent::source::manifest;
use lb_agent::state::Frontend;

/// The environment switch that rewrites the expected dumps instead of comparing with them.
const UPDATE: &str = "LB_UPDATE_GOLDEN";

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios")
}

/// Runs one scenario and prints the maps as the CLI does.
fn dump(dir: &Path) -> String {
    let objects_path = dir.join("objects.yaml");
    let agent_yaml = dir.join("agent.yaml");
    let file = agent_yaml.exists().then(|| {
        lb_agent::ops::config::load(&agent_yaml)
            .unwrap_or_else(|e| panic!("{}: {e}", agent_yaml.display()))
    });
    let objects_arg = objects_path.display().to_string();
    let config = lb_agent::cli::run_config(&["--manifests", &objects_arg], file.as_ref())
        .unwrap_or_else(|e| panic!("{}: {e:#}", agent_yaml.display()));
    let node_name = config
        .node_name
        .clone()
        .unwrap_or_else(|| panic!("{}: set node-name", agent_yaml.display()));

    // One sync, as `agent::syncer::Syncer::program` does it (without the host: no fallback to its addresses).
    let (objects, mut skipped) = manifest::load_path(&objects_path)
        .unwrap_or_else(|e| panic!("{}: {e}", objects_path.display()));
    let model_config = config.model_config(config.node_addresses.clone());
    let mut translator = Translator::new(
        model_config.clone(),
        model::node_context(&node_name, &[], &model_config),
    );
    translator.replace_all(objects);
    let node = model::node_context(&node_name, translator.nodes(), &model_config);
    assert!(
        !node.addresses.is_empty(),
        "{}: no node address (give node-address or this node's Node object)",
        dir.display()
    );
    translator.set_config(&model_config);
    translator.set_node(&node);
    translator.translate();
    let translation = translator.translation();
    skipped.extend(translation.diagnostics.iter().cloned());

    let mut maps = FakeMaps::default();
    let mut reconciler =
        Reconciler::restore(&maps, config.reconcile_config()).expect("restoring from empty maps");
    let report = reconciler.sync(&mut maps, &translation.state);
    let mut names = FakeNames::default();
    NameWriter::default()
        .sync(&mut names, &translation.state, |f: &Frontend| {
            reconciler.service_id(&service_key(f))
        })
        .expect("names written");
    let names = names
        .names()
        .expect("names read")
        .into_iter()
        .collect::<std::collections::HashMap<_, _>>();

    let mut out = String::new();
    let services = inspect::with_names(inspect::services(&maps).expect("services"), &names);
    let _ = writeln!(out, "# lb-agent services");
    out.push_str(&inspect::render_services(&services));
    let _ = writeln!(out, "\n# lb-agent backends");
    let backends = listings::backends(&maps).expect("backends");
    out.push_str(&listings::render_backends(&backends, &names));
    for svc in &services {
        let _ = writeln!(out, "\n# lb-agent maglev {}", svc.id);
        let found = listings::find_services(&maps, &svc.id.to_string()).expect("find");
        let views: Vec<_> = found
            .iter()
            .map(|(k, v)| listings::table(&maps, &names, k, v).expect("table"))
            .collect();
        out.push_str(listings::render_tables(&views).trim_end());
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "\n# node maps (LB_LOCAL_NETS, LB_SRC_RANGES, LB_VIPS, LB_SVC_CIDRS)"
    );
    out.push_str(&inspect::render_node_entries(
        &maps.node_entries().expect("node entries"),
    ));
    let _ = writeln!(out, "\n# skipped (logged as warnings)");
    for d in &skipped {
        // Paths in diagnostics name the scenario's file: keep only its name so the dump does not depend on where
        // the repository lies.
        let line = d.to_string().replace(&format!("{}/", dir.display()), "");
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "\n# not programmed");
    for (frontend, reason) in &report.failed {
        let _ = writeln!(out, "{frontend}: {reason}");
    }
    out
}

#[test]
fn scenarios_match_their_expected_maps() {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(scenarios_dir())
        .expect("tests/scenarios/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 8,
        "expected the scenario directories under {}",
        scenarios_dir().display()
    );
    let update = std::env::var_os(UPDATE).is_some_and(|v| v == "1");
    let mut failed = Vec::new();
    for dir in &dirs {
        let got = dump(dir);
        let expected_path = dir.join("expected.txt");
        if update {
            std::fs::write(&expected_path, &got).expect("writing expected.txt");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (generate it with {UPDATE}=1 and review it)",
                expected_path.display()
            )
        });
        if got != expected {
            failed.push(format!(
                "=== {}: the maps differ from expected.txt ({UPDATE}=1 rewrites it)\n--- expected\n{expected}\n--- got\n{got}",
                dir.display()
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
