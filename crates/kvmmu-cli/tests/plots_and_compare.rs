//! Plots are valid SVG/PNG files with the expected series; `compare` alternates configurations
//! and reports medians and ratios.

mod common;
use common::*;
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvmmu-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn svg_plot_names_every_phase_and_the_series() {
    let path = tmp("phases.svg");
    let p = path.to_str().unwrap();
    let r = json(&["mmu-stress", "-c", "2", "-m", "2M", "-s", "1M", "--plot", p]);
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(
        svg.starts_with("<svg") || svg.contains("<svg "),
        "not an SVG"
    );
    assert!(svg.trim_end().ends_with("</svg>"));
    // The text of every <text> element in order, joined by spaces: a name wrapped over two
    // lines under its bars reads whole again.
    let texts: Vec<&str> = svg
        .split("<text")
        .skip(1)
        .filter_map(|t| {
            t.split_once('>')
                .and_then(|(_, rest)| rest.split_once("</text>"))
        })
        .map(|(text, _)| text.trim())
        .collect();
    let joined = texts.join(" ");
    for name in phases(&r) {
        assert!(
            joined.contains(&name),
            "phase {name} not in the plot: {texts:?}"
        );
    }
    assert!(svg.contains("mmu-stress"), "series name missing");
    // One bar per phase (plus the legend swatch and background).
    assert!(svg.matches("<rect").count() > phases(&r).len());
}

#[test]
fn png_plot_is_a_png_of_the_expected_size() {
    let path = tmp("phases.png");
    let p = path.to_str().unwrap();
    json(&["access-tracking", "-b", "1M", "-w", "1", "--plot", p]);
    let png = std::fs::read(&path).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&png[12..16], b"IHDR");
    let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert!(w >= 640 && h == 520, "{w}x{h}");
    assert!(png.len() > 2000);
}

#[test]
fn bad_plot_extension_is_an_error() {
    let out = kvmmu(&[
        "mmu-stress",
        "-c",
        "1",
        "-m",
        "1M",
        "-s",
        "1M",
        "--plot",
        "x.gif",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(".svg or .png"));
}

#[test]
fn compare_reports_medians_and_ratios_per_configuration() {
    let path = tmp("compare.svg");
    let p = path.to_str().unwrap();
    let out = kvmmu(&[
        "compare",
        "--runs",
        "2",
        "--configs",
        "lockless,locked,no-aging",
        "--json",
        "--plot",
        p,
        "access-tracking",
        "-v",
        "1",
        "-b",
        "2M",
        "-p",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["schema"], "kvmmu-compare/1");
    assert_eq!(
        c["configs"],
        serde_json::json!(["lockless", "locked", "no-aging"])
    );
    assert_eq!(c["runs"], 2);
    assert_eq!(c["passed"], true);
    let rows = c["rows"].as_array().unwrap();
    let wall = rows
        .iter()
        .find(|r| r["name"] == "vcpu_wall_time_s")
        .expect("a vcpu_wall_time_s row");
    assert_eq!(wall["medians"].as_array().unwrap().len(), 3);
    assert_eq!(wall["ratios"][0], 1.0);
    assert!(wall["ratios"][1].as_f64().unwrap() > 0.0);
    let pass = rows
        .iter()
        .find(|r| r["name"] == "aging_avg_pass_s")
        .expect("an aging_avg_pass_s row");
    // The no-aging configuration ran no aging pass: no median.
    assert!(pass["medians"][2].is_null());
    let svg = std::fs::read_to_string(&path).unwrap();
    for s in ["lockless", "locked", "no-aging", "vcpu_wall_time_s"] {
        assert!(svg.contains(s), "{s} missing from the compare plot");
    }
}
