//! `kvmmu vs-kvm` end to end: one row per backend, real KVM first with ratio 1, positive costs.
//! Without `/dev/kvm` it prints one `SKIPPED` line and passes.

mod common;
use common::*;

#[test]
fn vs_kvm_json_has_a_row_per_backend_with_ratios_to_real_kvm() {
    if kvmmu_kvm::open_or_skip("vs_kvm_json_has_a_row_per_backend_with_ratios_to_real_kvm")
        .is_none()
    {
        return;
    }
    let r = json(&["vs-kvm", "-b", "2M", "--runs", "1"]);
    assert_eq!(r["schema"], "kvmmu-vs-kvm/1");
    let rows = r["rows"].as_array().expect("rows");
    let names: Vec<_> = rows
        .iter()
        .map(|x| x["backend"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["kvm", "kvmmu-tdp", "kvmmu-shadow"]);
    assert_eq!(rows[0]["populate_ratio"].as_f64(), Some(1.0));
    for row in rows {
        assert!(
            row["populate_ns_per_page"]
                .as_f64()
                .is_some_and(|v| v > 0.0),
            "{row}"
        );
    }
}
