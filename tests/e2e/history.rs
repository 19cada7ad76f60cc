//! Duration history: the second run of a tail-shaped suite (short tests first in collection
//! order, the long ones last) starts the longest tests first, because the first run recorded
//! how long each took.

use std::path::Path;

use fly_tests::db::FlyDb;
use fly_tests::fly;
use fly_tests::sandbox::Sandbox;
use fly_tests::HANG_GUARD;

/// Writes a suite whose long tests sit in the last file: collection order starts them last.
fn write_tail_suite(dir: &Path) {
    std::fs::create_dir_all(dir).expect("suite dir");
    for file in 0..4 {
        let mut body = String::from("import time\n");
        for test in 0..6 {
            body.push_str(&format!(
                "\ndef test_short_{test}():\n    time.sleep(0.01)\n"
            ));
        }
        std::fs::write(dir.join(format!("test_a{file}.py")), body).expect("write suite");
    }
    std::fs::write(
        dir.join("test_zz_slow.py"),
        "import time\n\ndef test_long():\n    time.sleep(1.2)\n\n\
         def test_medium():\n    time.sleep(0.6)\n",
    )
    .expect("write suite");
}

/// The nodeids of a run in the order their setup began.
fn start_order(db: &FlyDb, run_id: &str) -> Vec<String> {
    let rows = db
        .query(
            "reports",
            "SELECT nodeid FROM reports WHERE run_id = ?1 AND phase = 'setup' ORDER BY start",
            &[&run_id],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    rows.iter().map(|r| r.text("nodeid")).collect()
}

#[test]
fn the_second_run_of_a_tail_shaped_suite_starts_the_longest_tests_first() {
    let sandbox = Sandbox::new("history");
    let suite = sandbox.path("suite");
    write_tail_suite(&suite);
    let db = sandbox.path("fly.db");

    let first = fly::run_local(&suite, &db, None, &[]).wait(HANG_GUARD);
    assert_eq!(first.code, Some(0), "first run\n{}", first.describe());
    let first_id = FlyDb::open_or_panic(&db).run_id();
    let order = start_order(&FlyDb::open_or_panic(&db), &first_id);
    assert_eq!(order.len(), 26);
    assert!(
        !order[..2]
            .iter()
            .any(|id| id.starts_with("test_zz_slow.py")),
        "without history, collection order puts the long tests last: {order:?}"
    );

    let second = fly::run_local(&suite, &db, None, &[]).wait(HANG_GUARD);
    assert_eq!(second.code, Some(0), "second run\n{}", second.describe());
    let db = FlyDb::open_or_panic(&db);
    let second_id = db.run_id();
    assert_ne!(first_id, second_id);
    let order = start_order(&db, &second_id);
    assert_eq!(order.len(), 26, "{order:?}");
    // Both workers start a test at once: which of them reaches its setup a few microseconds
    // sooner is up to the operating system.
    assert!(
        order[..2]
            .iter()
            .any(|id| id == "test_zz_slow.py::test_long"),
        "the longest test starts first: {order:?}"
    );
}
