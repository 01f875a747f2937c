//! `use_native_openblas_kernel` replaces a generic OpenBLAS kernel at run time. The test
//! re-runs itself with OPENBLAS_CORETYPE=Prescott (read when OpenBLAS loads) to create the
//! situation a misdetected CPU is in; this binary holds one test so no other thread runs BLAS.

mod common;

use common::{assert_close, random, random_layer, rng, to_f64, Ref};

#[test]
fn native_kernel_replaces_generic_kernel() {
    if std::env::var_os("NDLORA_KERNEL_CHILD").is_none() {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "native_kernel_replaces_generic_kernel",
                "--nocapture",
            ])
            .env("NDLORA_KERNEL_CHILD", "1")
            .env("OPENBLAS_CORETYPE", "Prescott")
            .status()
            .unwrap();
        assert!(status.success());
        return;
    }
    let before = ndlora::backend();
    println!("before: {before}");
    let applicable = before.name == "openblas"
        && before
            .config
            .as_deref()
            .unwrap_or("")
            .contains("DYNAMIC_ARCH")
        && before.warning.is_some();
    // SAFETY: the only test in this process; no other thread calls BLAS or touches the env.
    let switched = unsafe { ndlora::use_native_openblas_kernel() };
    let after = ndlora::backend();
    println!("after: {after}");
    if applicable {
        let core = switched.expect("a DYNAMIC_ARCH OpenBLAS on a generic kernel must switch");
        assert_eq!(after.core.as_deref(), Some(core.as_str()));
        assert!(after.warning.is_none(), "{after}");
        assert!(
            std::env::var("OPENBLAS_CORETYPE").as_deref() == Ok("Prescott"),
            "env restored"
        );
    } else {
        println!("not applicable here (no OpenBLAS DYNAMIC_ARCH or no AVX2): nothing to switch");
        assert!(switched.is_none());
    }
    // Results are still right with whichever kernel now runs.
    let layer = random_layer::<f32>(70, 130, 4, 9);
    let x = random::<f32>(&mut rng(10), 33, 130);
    let reference = Ref::new(&layer);
    let x64 = to_f64(x.view());
    let y = layer.forward(x.view()).unwrap();
    assert_close(
        y.view(),
        &reference.forward(&x64),
        &reference.forward_magnitude(&x64),
        8.0,
        "after switch",
    );
}
