//! The object store through real S3 clients: the AWS CLI, boto3 (its default checksums)
//! and rclone, against a real `maru up`; access keys, lost volumes, flipped bits and the
//! data at rest.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::harness::Node;

/// An access key for `buckets`: (id, secret).
pub(crate) fn key(node: &Node, buckets: &[&str]) -> (String, String) {
    let mut args = vec!["store", "keys", "create", "--json"];
    for bucket in buckets {
        args.extend(["--bucket", bucket]);
    }
    let text = node.cli_ok(&args);
    let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    (
        value["access_key"].as_str().expect("key").to_string(),
        value["secret"].as_str().expect("secret").to_string(),
    )
}

/// A client command with the key and endpoint in its environment and nothing of the
/// machine's own AWS configuration.
pub(crate) fn client(node: &Node, key: &(String, String), program: &str) -> Command {
    let dir = node.data.parent().expect("parent");
    let scheme = if node.tls { "https" } else { "http" };
    let mut command = Command::new(program);
    command
        .current_dir(dir)
        .env("AWS_ACCESS_KEY_ID", &key.0)
        .env("AWS_SECRET_ACCESS_KEY", &key.1)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", format!("{scheme}://{}", node.s3))
        .env("AWS_CONFIG_FILE", dir.join("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.join("no-aws-credentials"),
        )
        .env_remove("AWS_CA_BUNDLE")
        .env_remove("AWS_PROFILE");
    if node.tls {
        command.env("AWS_CA_BUNDLE", node.data.join("tls/ca.pem"));
    }
    command
}

fn ok(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub(crate) fn aws(node: &Node, key: &(String, String), args: &[&str]) -> Output {
    let quiet = matches!(args, ["s3", "cp" | "sync" | "rm", ..]);
    client(node, key, "aws")
        .args(args)
        .args(if quiet {
            &["--only-show-errors"][..]
        } else {
            &[][..]
        })
        .output()
        .expect("run aws (xtask installs it from PyPI)")
}

fn random_file(path: &Path, len: usize, seed: u64) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(path, bytes).expect("write");
}

#[test]
fn the_aws_cli_copies_syncs_lists_removes_and_presigns() {
    let node = Node::start();
    let key = key(&node, &["city-archive"]);
    let dir = node.data.parent().expect("parent").to_path_buf();
    ok(aws(&node, &key, &["s3", "mb", "s3://city-archive"]), "mb");
    // 100 MiB: the CLI uploads it in 8 MiB parts.
    random_file(&dir.join("big.bin"), 100 << 20, 1);
    ok(
        aws(
            &node,
            &key,
            &["s3", "cp", "big.bin", "s3://city-archive/2026/big.bin"],
        ),
        "cp up",
    );
    ok(
        aws(
            &node,
            &key,
            &["s3", "cp", "s3://city-archive/2026/big.bin", "back.bin"],
        ),
        "cp down",
    );
    assert!(
        std::fs::read(dir.join("big.bin")).expect("read")
            == std::fs::read(dir.join("back.bin")).expect("read"),
        "the 100 MiB file came back different"
    );
    let head = ok(
        aws(
            &node,
            &key,
            &[
                "s3api",
                "head-object",
                "--bucket",
                "city-archive",
                "--key",
                "2026/big.bin",
            ],
        ),
        "head",
    );
    assert!(
        head.contains("-13\\\""),
        "a multipart ETag ends in -N: {head}"
    );

    std::fs::create_dir_all(dir.join("tree/sub")).expect("mkdir");
    std::fs::write(dir.join("tree/a.txt"), "loop 17: 412 vehicles").expect("write");
    std::fs::write(dir.join("tree/sub/b.txt"), "loop 18: 97 vehicles").expect("write");
    ok(
        aws(
            &node,
            &key,
            &["s3", "sync", "tree", "s3://city-archive/tree"],
        ),
        "sync",
    );
    let listed = ok(
        aws(
            &node,
            &key,
            &["s3", "ls", "--recursive", "s3://city-archive/"],
        ),
        "ls",
    );
    for name in ["2026/big.bin", "tree/a.txt", "tree/sub/b.txt"] {
        assert!(listed.contains(name), "{name} not listed: {listed}");
    }
    // A second sync finds nothing to do; a deleted local file is deleted remotely.
    std::fs::remove_file(dir.join("tree/a.txt")).expect("rm");
    ok(
        aws(
            &node,
            &key,
            &["s3", "sync", "--delete", "tree", "s3://city-archive/tree"],
        ),
        "sync --delete",
    );
    let listed = ok(
        aws(
            &node,
            &key,
            &["s3", "ls", "--recursive", "s3://city-archive/tree/"],
        ),
        "ls",
    );
    assert!(
        !listed.contains("a.txt") && listed.contains("b.txt"),
        "{listed}"
    );

    let url = ok(
        aws(
            &node,
            &key,
            &[
                "s3",
                "presign",
                "s3://city-archive/tree/sub/b.txt",
                "--expires-in",
                "300",
            ],
        ),
        "presign",
    );
    let fetched = Command::new("curl")
        .args(["-s", "-f", url.trim()])
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&fetched.stdout),
        "loop 18: 97 vehicles"
    );
    let tampered = url.trim().replace("b.txt", "a.txt");
    let refused = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &tampered])
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&refused.stdout),
        "403",
        "a presigned URL signs its path"
    );

    ok(
        aws(
            &node,
            &key,
            &["s3", "rm", "--recursive", "s3://city-archive/"],
        ),
        "rm",
    );
    ok(aws(&node, &key, &["s3", "rb", "s3://city-archive"]), "rb");
}

const BOTO3: &str = r#"
import base64, hashlib, os, sys
import boto3
from botocore.config import Config
s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
s3.create_bucket(Bucket="sensors")
# Default checksums (CRC32 header on PUT, checksum mode on GET).
s3.put_object(Bucket="sensors", Key="air/seoul.json", Body=b'{"pm10": 31}', ContentType="application/json", Metadata={"station": "jongno"})
got = s3.get_object(Bucket="sensors", Key="air/seoul.json", ChecksumMode="ENABLED")
assert got["Body"].read() == b'{"pm10": 31}'
assert got["ContentType"] == "application/json", got["ContentType"]
assert got["Metadata"] == {"station": "jongno"}, got["Metadata"]
# A wrong Content-MD5 is refused and nothing is stored.
try:
    s3.put_object(Bucket="sensors", Key="bad", Body=b"abc", ContentMD5=base64.b64encode(hashlib.md5(b"xyz").digest()).decode())
    sys.exit("a wrong Content-MD5 was accepted")
except s3.exceptions.ClientError as e:
    assert e.response["Error"]["Code"] == "BadDigest", e.response
try:
    s3.head_object(Bucket="sensors", Key="bad")
    sys.exit("a refused PUT left an object")
except s3.exceptions.ClientError as e:
    assert e.response["Error"]["Code"] in ("404", "NoSuchKey"), e.response
# A wrong CRC32 is refused too.
try:
    s3.put_object(Bucket="sensors", Key="bad", Body=b"abc", ChecksumCRC32="AAAAAA==")
    sys.exit("a wrong CRC32 was accepted")
except s3.exceptions.ClientError as e:
    assert e.response["Error"]["Code"] == "BadDigest", e.response
# Multipart through the transfer manager, with its default checksums.
data = os.urandom(20 * 1024 * 1024)
with open("twenty.bin", "wb") as f:
    f.write(data)
s3.upload_file("twenty.bin", "sensors", "raw/twenty.bin")
part = s3.get_object(Bucket="sensors", Key="raw/twenty.bin", Range="bytes=1000-1999")
assert part["Body"].read() == data[1000:2000]
assert part["ContentRange"] == "bytes 1000-1999/20971520", part["ContentRange"]
# Conditional GET.
etag = s3.head_object(Bucket="sensors", Key="air/seoul.json")["ETag"]
try:
    s3.get_object(Bucket="sensors", Key="air/seoul.json", IfNoneMatch=etag)
    sys.exit("If-None-Match with the current ETag served the object")
except s3.exceptions.ClientError as e:
    assert e.response["Error"]["Code"] in ("304", "NotModified"), e.response
# Copy, and copy with replaced metadata.
s3.copy_object(Bucket="sensors", Key="air/copy.json", CopySource={"Bucket": "sensors", "Key": "air/seoul.json"})
assert s3.get_object(Bucket="sensors", Key="air/copy.json")["Metadata"] == {"station": "jongno"}
# Pages of a listing.
for i in range(7):
    s3.put_object(Bucket="sensors", Key=f"loops/{i:02}", Body=b"x")
seen, token = [], None
while True:
    args = {"Bucket": "sensors", "Prefix": "loops/", "MaxKeys": 3}
    if token:
        args["ContinuationToken"] = token
    page = s3.list_objects_v2(**args)
    seen += [o["Key"] for o in page.get("Contents", [])]
    if not page["IsTruncated"]:
        break
    token = page["NextContinuationToken"]
assert seen == [f"loops/{i:02}" for i in range(7)], seen
delimited = s3.list_objects_v2(Bucket="sensors", Delimiter="/")
assert [p["Prefix"] for p in delimited["CommonPrefixes"]] == ["air/", "loops/", "raw/"], delimited
# DeleteObjects, then an aborted upload leaves nothing.
s3.delete_objects(Bucket="sensors", Delete={"Objects": [{"Key": f"loops/{i:02}"} for i in range(7)]})
assert "Contents" not in s3.list_objects_v2(Bucket="sensors", Prefix="loops/")
upload = s3.create_multipart_upload(Bucket="sensors", Key="half")["UploadId"]
s3.upload_part(Bucket="sensors", Key="half", UploadId=upload, PartNumber=1, Body=b"y" * 1000)
assert len(s3.list_multipart_uploads(Bucket="sensors")["Uploads"]) == 1
s3.abort_multipart_upload(Bucket="sensors", Key="half", UploadId=upload)
assert "Uploads" not in s3.list_multipart_uploads(Bucket="sensors")
print("boto3: ok")
"#;

#[test]
fn boto3_works_with_its_default_checksums() {
    let node = Node::start();
    let key = key(&node, &["sensors"]);
    let output = client(&node, &key, "python3")
        .args(["-c", BOTO3])
        .output()
        .expect("run python3 (xtask installs boto3 from PyPI)");
    let stdout = ok(output, "the boto3 script");
    assert!(stdout.contains("boto3: ok"), "{stdout}");
}

#[test]
fn rclone_copies_syncs_and_checks() {
    let node = Node::start();
    let key = key(&node, &["backups"]);
    let dir = node.data.parent().expect("parent").to_path_buf();
    std::fs::write(
        dir.join("rclone.conf"),
        format!(
            "[maru]\ntype = s3\nprovider = Other\naccess_key_id = {}\nsecret_access_key = {}\nregion = us-east-1\nendpoint = http://{}\nforce_path_style = true\n",
            key.0, key.1, node.s3
        ),
    )
    .expect("write rclone.conf");
    std::fs::create_dir_all(dir.join("records/2026")).expect("mkdir");
    random_file(&dir.join("records/2026/permits.db"), 12 << 20, 7);
    std::fs::write(dir.join("records/index.txt"), "permits 2026").expect("write");
    let rclone = |args: &[&str]| {
        client(&node, &key, "rclone")
            .args(["--config", "rclone.conf"])
            .args(args)
            .output()
            .expect("run rclone (xtask installs it)")
    };
    ok(rclone(&["mkdir", "maru:backups"]), "rclone mkdir");
    ok(
        rclone(&["copy", "records", "maru:backups/records"]),
        "rclone copy",
    );
    ok(
        rclone(&["check", "records", "maru:backups/records"]),
        "rclone check",
    );
    std::fs::write(dir.join("records/index.txt"), "permits 2026, revised").expect("write");
    std::fs::remove_file(dir.join("records/2026/permits.db")).expect("rm");
    ok(
        rclone(&["sync", "records", "maru:backups/records"]),
        "rclone sync",
    );
    ok(
        rclone(&["check", "records", "maru:backups/records"]),
        "rclone check after sync",
    );
    let listed = ok(rclone(&["ls", "maru:backups"]), "rclone ls");
    assert!(
        listed.contains("records/index.txt") && !listed.contains("permits.db"),
        "{listed}"
    );
}

#[test]
fn access_keys_reach_only_their_buckets_and_revocation_is_immediate() {
    let node = Node::start();
    let traffic = key(&node, &["traffic"]);
    let payments = key(&node, &["payments"]);
    ok(aws(&node, &traffic, &["s3", "mb", "s3://traffic"]), "mb");
    ok(aws(&node, &payments, &["s3", "mb", "s3://payments"]), "mb");
    let refused = aws(&node, &traffic, &["s3", "ls", "s3://payments"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("AccessDenied"),
        "{refused:?}"
    );
    let listed = ok(aws(&node, &traffic, &["s3", "ls"]), "ls");
    assert!(
        listed.contains("traffic") && !listed.contains("payments"),
        "{listed}"
    );
    let wrong = (traffic.0.clone(), "x".repeat(40));
    let forged = aws(&node, &wrong, &["s3", "ls", "s3://traffic"]);
    assert!(
        String::from_utf8_lossy(&forged.stderr).contains("SignatureDoesNotMatch"),
        "{forged:?}"
    );
    node.cli_ok(&["store", "keys", "revoke", &traffic.0]);
    let revoked = aws(&node, &traffic, &["s3", "ls", "s3://traffic"]);
    assert!(
        String::from_utf8_lossy(&revoked.stderr).contains("InvalidAccessKeyId"),
        "{revoked:?}"
    );
    let keys = node.cli_ok(&["store", "keys", "list"]);
    assert!(
        keys.contains(&payments.0) && !keys.contains(&traffic.0),
        "{keys}"
    );
    assert!(!keys.contains(&payments.1), "secrets are never listed");
}

/// Every file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

fn shard_files(node: &Node, volume: usize) -> Vec<PathBuf> {
    files(&node.data.join(format!("store/volumes/v{volume}/objects")))
}

#[test]
fn a_flipped_bit_and_two_lost_volumes_lose_nothing_and_the_scrub_heals_them() {
    let mut node = Node::start();
    let key = key(&node, &["relief"]);
    let dir = node.data.parent().expect("parent").to_path_buf();
    ok(aws(&node, &key, &["s3", "mb", "s3://relief"]), "mb");
    for i in 0..5u64 {
        random_file(
            &dir.join(format!("p{i}.bin")),
            300_000 + i as usize * 50_000,
            i + 10,
        );
        ok(
            aws(
                &node,
                &key,
                &[
                    "s3",
                    "cp",
                    &format!("p{i}.bin"),
                    &format!("s3://relief/payments/p{i}.bin"),
                ],
            ),
            "cp",
        );
    }
    let read_all = |node: &Node, tag: &str| {
        for i in 0..5u64 {
            let name = format!("{tag}{i}.bin");
            ok(
                aws(
                    node,
                    &key,
                    &["s3", "cp", &format!("s3://relief/payments/p{i}.bin"), &name],
                ),
                "cp back",
            );
            assert!(
                std::fs::read(dir.join(format!("p{i}.bin"))).expect("read")
                    == std::fs::read(dir.join(&name)).expect("read"),
                "p{i} came back different ({tag})"
            );
        }
    };
    // The default store: six volumes, RS(4,2). A flipped bit is never served, and the
    // scrub rewrites the block.
    node.stop();
    let victim = shard_files(&node, 2).into_iter().next().expect("a shard");
    let mut bytes = std::fs::read(&victim).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&victim, bytes).expect("write");
    node.restart();
    read_all(&node, "flipped");
    let scrubbed: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["store", "scrub", "--json"])).expect("JSON");
    assert_eq!(scrubbed["scrub"]["blocks_bad"], 1, "{scrubbed}");
    assert_eq!(scrubbed["scrub"]["blocks_healed"], 1, "{scrubbed}");
    // Two volumes lose every shard: everything reads back, and the scrub rebuilds them.
    node.stop();
    for volume in [1, 4] {
        for file in shard_files(&node, volume) {
            std::fs::remove_file(file).expect("rm");
        }
    }
    node.restart();
    read_all(&node, "two-lost");
    let scrubbed: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["store", "scrub", "--json"])).expect("JSON");
    assert!(
        scrubbed["scrub"]["blocks_healed"].as_u64().expect("count") > 0,
        "{scrubbed}"
    );
    assert_eq!(
        scrubbed["scrub"]["degraded"],
        serde_json::json!([]),
        "{scrubbed}"
    );
    assert_eq!(
        scrubbed["scrub"]["lost"],
        serde_json::json!([]),
        "{scrubbed}"
    );
    // Healed: two *other* volumes may go now.
    node.stop();
    for volume in [0, 5] {
        for file in shard_files(&node, volume) {
            std::fs::remove_file(file).expect("rm");
        }
    }
    node.restart();
    for i in 0..5u64 {
        ok(
            aws(
                &node,
                &key,
                &[
                    "s3",
                    "cp",
                    &format!("s3://relief/payments/p{i}.bin"),
                    &format!("again{i}.bin"),
                ],
            ),
            "cp again",
        );
        assert!(
            std::fs::read(dir.join(format!("p{i}.bin"))).expect("read")
                == std::fs::read(dir.join(format!("again{i}.bin"))).expect("read")
        );
    }
    // A third volume lost at once is more than RS(4,2) survives: each object says so
    // clearly, and the node goes on serving.
    node.stop();
    for volume in [0, 1, 3] {
        for file in shard_files(&node, volume) {
            std::fs::remove_file(file).expect("rm");
        }
    }
    node.restart();
    let failed = aws(
        &node,
        &key,
        &["s3", "cp", "s3://relief/payments/p0.bin", "lost.bin"],
    );
    assert!(!failed.status.success());
    let status = node.cli_ok(&["store", "scrub"]);
    assert!(status.contains("LOST: relief/payments/p0.bin"), "{status}");
    assert_eq!(
        node.get("/nothing-here").status,
        404,
        "the gateway still serves"
    );
    ok(
        aws(&node, &key, &["s3", "ls", "s3://relief/payments/"]),
        "listing still works",
    );
}

#[test]
fn no_plaintext_of_objects_or_their_metadata_lies_under_the_data_directory() {
    let node = Node::start();
    let key = key(&node, &["citizens"]);
    let dir = node.data.parent().expect("parent").to_path_buf();
    let secret =
        "resident 900101-2345678 relocated to Mapo-gu, benefit 1,250,000 KRW\n".repeat(2000);
    std::fs::write(dir.join("record.txt"), &secret).expect("write");
    ok(aws(&node, &key, &["s3", "mb", "s3://citizens"]), "mb");
    ok(
        aws(
            &node,
            &key,
            &[
                "s3",
                "cp",
                "record.txt",
                "s3://citizens/r.txt",
                "--metadata",
                "caseworker=Park Jiwoo 7781",
            ],
        ),
        "cp",
    );
    let back = ok(
        aws(
            &node,
            &key,
            &[
                "s3api",
                "head-object",
                "--bucket",
                "citizens",
                "--key",
                "r.txt",
            ],
        ),
        "head",
    );
    assert!(back.contains("Park Jiwoo 7781"), "{back}");
    for file in files(&node.data) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        for needle in ["900101-2345678", "Mapo-gu", "Park Jiwoo"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} holds `{needle}` in plaintext",
                file.display()
            );
        }
    }
}

/// A process service with `store_bucket` gets the endpoint, the CA and a key limited to its
/// bucket: `examples/traffic`'s archiver keeps each hour's counts as an object. Removing the
/// app revokes the key.
#[test]
fn the_traffic_archive_keeps_each_hours_counts_as_an_object() {
    // Over TLS: the archiver (Python's standard library, inside its Landlock sandbox) trusts
    // the node CA that Maru names in AWS_CA_BUNDLE.
    let node = Node::start_tls("");
    crate::harness::component("traffic");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/traffic/maru.toml");
    node.cli_ok(&["deploy", manifest.to_str().expect("utf-8")]);
    let keys = node.cli_ok(&["store", "keys", "list"]);
    assert!(
        keys.contains("traffic-archive") && keys.contains("service traffic/archive"),
        "{keys}"
    );
    // 10:00 UTC on 2026-12-01, and ten minutes later.
    let base_ms: u64 = 1_796_119_200_000;
    for (i, place) in ["jongno-1", "jongno-1", "mapo-3"].iter().enumerate() {
        let body = format!(
            "{{\"loop\":\"north-1\",\"vehicles\":{},\"at_ms\":{}}}",
            (i + 1) * 10,
            base_ms + i as u64 * 600_000
        );
        let answer = crate::events::post(
            &node,
            "/events/city.traffic",
            Some(&node.ingest_token),
            &[
                ("Content-Type", "application/json"),
                ("ce-partitionkey", place),
            ],
            body.as_bytes(),
        );
        assert_eq!(answer.status, 202, "{}", answer.body);
    }
    let admin = key(&node, &["*"]);
    let mut object = String::new();
    node.wait_for(
        "the hour's object",
        std::time::Duration::from_secs(30),
        || {
            let output = aws(
                &node,
                &admin,
                &[
                    "s3",
                    "cp",
                    "s3://traffic-archive/traffic/2026-12-01/10.json",
                    "-",
                ],
            );
            object = String::from_utf8_lossy(&output.stdout).into_owned();
            object.contains("\"readings\": 3")
        },
    );
    let counts: serde_json::Value = serde_json::from_str(&object).expect("JSON");
    assert_eq!(
        counts["intersections"],
        serde_json::json!({ "jongno-1": 30, "mapo-3": 30 }),
        "{object}"
    );
    node.cli_ok(&["rm", "traffic"]);
    let keys = node.cli_ok(&["store", "keys", "list"]);
    assert!(
        !keys.contains("service traffic/archive"),
        "revoked with the app: {keys}"
    );
    // The instances' temporary root, where the CA copy was published, goes with the node.
    let data = node.data.canonicalize().expect("data dir");
    let tag = blake3::hash(data.as_os_str().as_encoded_bytes()).to_hex();
    let root = std::env::temp_dir().join(format!("maru-instances-{}", &tag[..16]));
    assert!(root.join("maru-ca.pem").exists(), "published while up");
    let mut node = node;
    node.stop();
    assert!(!root.exists(), "{} is left behind", root.display());
}

/// Virtual-hosted-style requests through boto3 (the machine has no DNS for the test
/// domain, so the script's resolver maps it to the node), the rate limit per access key, and
/// the bound on bodies moving at once: both answer `503 SlowDown`, which clients retry.
const LIMITS: &str = r#"
import http.client, os, socket, sys, threading, time, urllib.parse
import boto3, botocore.config

port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
real_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if isinstance(host, str) and host.endswith(".maru.test"):
        host = "127.0.0.1"
    return real_getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo

def client(addressing, attempts=None):
    retries = {"mode": "standard"}
    if attempts:
        retries["total_max_attempts"] = attempts
    return boto3.client(
        "s3",
        endpoint_url=f"http://s3.maru.test:{port}",
        config=botocore.config.Config(s3={"addressing_style": addressing}, retries=retries),
    )

# Virtual-hosted style: every request's Host is BUCKET.s3.maru.test.
virtual = client("virtual")
virtual.create_bucket(Bucket="cameras")
seen = []
def record(request, **kwargs):
    seen.append(urllib.parse.urlsplit(request.url).netloc)
virtual.meta.events.register("before-send.s3", record)
virtual.put_object(Bucket="cameras", Key="gate/1.jpg", Body=b"still-1", Metadata={"gate": "north"})
assert virtual.get_object(Bucket="cameras", Key="gate/1.jpg")["Body"].read() == b"still-1"
listed = virtual.list_objects_v2(Bucket="cameras", Prefix="gate/")
assert [o["Key"] for o in listed["Contents"]] == ["gate/1.jpg"], listed
assert all(host == f"cameras.s3.maru.test:{port}" for host in seen), seen
# Path style on the same node reads the same object.
path = client("path")
assert path.get_object(Bucket="cameras", Key="gate/1.jpg")["Body"].read() == b"still-1"
# A presigned virtual-hosted URL, fetched by a plain HTTP client.
url = virtual.generate_presigned_url("get_object", Params={"Bucket": "cameras", "Key": "gate/1.jpg"})
parts = urllib.parse.urlsplit(url)
assert parts.netloc == f"cameras.s3.maru.test:{port}", url
conn = http.client.HTTPConnection("127.0.0.1", port)
conn.request("GET", parts.path + "?" + parts.query, headers={"Host": parts.netloc})
reply = conn.getresponse()
assert reply.status == 200 and reply.read() == b"still-1", reply.status
print("virtual hosts: ok")

# The rate limit: 20 requests per second per key. Without retries, a burst of 80 from 8
# threads gets SlowDown answers, and no more get through than a second's worth plus what
# refilled while the burst lasted (however slow this machine is at the moment).
results = []
def burst():
    mine = client("path", attempts=1)
    for _ in range(10):
        try:
            mine.head_object(Bucket="cameras", Key="gate/1.jpg")
            results.append("ok")
        except mine.exceptions.ClientError as e:
            assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 503, e.response
            # A HEAD answer has no body: boto3 names the error by its status.
            assert e.response["Error"]["Code"] in ("SlowDown", "503"), e.response
            results.append("slow")
clients = [threading.Thread(target=burst) for _ in range(8)]
started = time.monotonic()
for t in clients:
    t.start()
for t in clients:
    t.join()
elapsed = time.monotonic() - started
granted, slowed = results.count("ok"), results.count("slow")
assert granted + slowed == 80, results
assert slowed > 0 and granted <= 20 + 20 * elapsed + 2, (granted, slowed, elapsed)
once = client("path", attempts=1)
# boto3's own retries (standard mode backs off) carry a burst through.
patient = client("path", attempts=10)
for i in range(40):
    patient.head_object(Bucket="cameras", Key="gate/1.jpg")
print(f"rate: ok ({granted} granted, {slowed} slowed)")

# One body at a time (transfers_max = 1), waiting at most 1 s: while a slow PUT holds the
# turn, a GET is answered SlowDown after about a second; then both work.
time.sleep(1.5)
url = path.generate_presigned_url("put_object", Params={"Bucket": "cameras", "Key": "slow.bin"})
parts = urllib.parse.urlsplit(url)
slow = http.client.HTTPConnection("127.0.0.1", port)
slow.putrequest("PUT", parts.path + "?" + parts.query, skip_host=True)
slow.putheader("Host", parts.netloc)
slow.putheader("Content-Length", "2000")
slow.endheaders()
slow.send(b"a" * 1000)
time.sleep(0.5)
started = time.monotonic()
try:
    once.get_object(Bucket="cameras", Key="gate/1.jpg")
    sys.exit("a GET got a turn while the only one was held")
except once.exceptions.ClientError as e:
    assert e.response["Error"]["Code"] == "SlowDown", e.response
waited = time.monotonic() - started
assert 0.8 < waited < 5, waited
slow.send(b"b" * 1000)
reply = slow.getresponse()
assert reply.status == 200, (reply.status, reply.read())
body = once.get_object(Bucket="cameras", Key="slow.bin")["Body"].read()
assert body == b"a" * 1000 + b"b" * 1000
print("transfers: ok")
"#;

#[test]
fn virtual_hosts_rate_limits_and_the_transfer_bound_work_with_boto3() {
    let node = Node::start_with_config(
        "[store]\ndomains = [\"s3.maru.test\"]\nrequests_per_second_per_key = 20\ntransfers_max = 1\ntransfer_wait = \"1s\"\n",
    );
    let key = key(&node, &["cameras"]);
    let output = client(&node, &key, "python3")
        .args(["-c", LIMITS])
        .output()
        .expect("run python3 (xtask installs boto3 from PyPI)");
    let stdout = ok(output, "the limits script");
    for line in ["virtual hosts: ok", "rate: ok", "transfers: ok"] {
        assert!(stdout.contains(line), "{stdout}");
    }
}
