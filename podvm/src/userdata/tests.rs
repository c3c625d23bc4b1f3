use super::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

/// The initdata of the reference's documentation, plain and gzipped, and its
/// sha384 (computed independently, with Python's hashlib).
const DOC: &str = "algorithm = \"sha384\"\nversion = \"0.1.0\"\n\n[data]\n\"aa.toml\" = \"\"\"\n[token_configs]\n\"\"\"\n\"policy.rego\" = \"package agent_policy\"\n";
const PLAIN: &str = "YWxnb3JpdGhtID0gInNoYTM4NCIKdmVyc2lvbiA9ICIwLjEuMCIKCltkYXRhXQoiYWEudG9tbCIgPSAiIiIKW3Rva2VuX2NvbmZpZ3NdCiIiIgoicG9saWN5LnJlZ28iID0gInBhY2thZ2UgYWdlbnRfcG9saWN5Igo=";
const GZIPPED: &str = "H4sIAGfYBmsC/yXKQQqDMBCF4f2cIrwDBItduOlJpMgQYwzGjCSD4O2N7eJt/u9xClKirrv5GNSV++ENOn2pUfKTOvuyHYjGmZW/BGarsic8BtCosvk8OclLDLV5azgkRXfZ4oP8fge7jYM3bVmnv4JuQe6f/XoAAAA=";
const SHA384: &str = "2c6e3923824751b4f0d907c0e0d1c6a49c1c12959f5ea667666966ff18706d814a49ef05d165bce9d7836b789de0d7d8";

fn user_data(files: &[(&str, &str)]) -> String {
    let mut out = String::from("#cloud-config\nwrite_files:\n");
    for (path, content) in files {
        out.push_str(&format!(
            "- path: {path}\n  content: {}\n",
            serde_json::to_string(content).unwrap()
        ));
    }
    out
}

#[test]
fn parses_the_allowed_files() {
    let files = parse(&user_data(&[
        ("/run/peerpod/apf.json", "{\"pod-name\":\"web\"}"),
        ("/run/peerpod/scratch-space.marker", ""),
    ]))
    .unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(files[0].name, "apf.json");
    assert_eq!(files[0].content, "{\"pod-name\":\"web\"}");
    // YAML's block scalars work too (the reference's own renderer uses them).
    let block = "#cloud-config\nwrite_files:\n  - path: /run/peerpod/aa.toml\n    content: |\n      [token_configs]\n      x = 1\n";
    assert_eq!(parse(block).unwrap()[0].content, "[token_configs]\nx = 1\n");
}

#[test]
fn everything_else_is_refused_with_its_reason() {
    let cases: Vec<(String, UserDataError)> = vec![
        ("write_files: []\n".into(), UserDataError::NotCloudConfig),
        (
            user_data(&[("/etc/passwd", "x")]),
            UserDataError::PathNotAllowed("/etc/passwd".into()),
        ),
        (
            user_data(&[("/run/peerpod/../../etc/passwd", "x")]),
            UserDataError::PathNotAllowed("/run/peerpod/../../etc/passwd".into()),
        ),
        (
            user_data(&[("/run/peerpod/other.json", "x")]),
            UserDataError::PathNotAllowed("/run/peerpod/other.json".into()),
        ),
        (
            user_data(&[
                ("/run/peerpod/apf.json", "a"),
                ("/run/peerpod/apf.json", "b"),
            ]),
            UserDataError::Duplicate("/run/peerpod/apf.json".into()),
        ),
        (
            user_data(&[("/run/peerpod/auth.json", &"x".repeat(MAX_AUTH_JSON + 1))]),
            UserDataError::FileTooLarge {
                path: "/run/peerpod/auth.json".into(),
                size: MAX_AUTH_JSON + 1,
                limit: MAX_AUTH_JSON,
            },
        ),
        (
            format!("#cloud-config\n# {}\n", "x".repeat(MAX_USER_DATA)),
            UserDataError::TooLarge {
                size: MAX_USER_DATA + 17,
                limit: MAX_USER_DATA,
            },
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(
            parse(&text).unwrap_err(),
            expected,
            "{}",
            &text[..text.len().min(80)]
        );
    }
    for malformed in [
        "#cloud-config\nwrite_files: [\n",
        "#cloud-config\nruncmd: [\"rm -rf /\"]\nwrite_files: []\n",
        "#cloud-config\nwrite_files:\n- path: /run/peerpod/apf.json\n  content: x\n  permissions: '0777'\n",
        "#cloud-config\nwrite_files:\n- path: /run/peerpod/apf.json\n",
        "#cloud-config\n",
    ] {
        let e = parse(malformed).unwrap_err();
        assert!(
            matches!(e, UserDataError::Malformed(_)),
            "{malformed:?}: {e}"
        );
    }
}

#[test]
fn initdata_decodes_plain_and_gzipped_with_its_digest() {
    for encoded in [PLAIN, GZIPPED] {
        let d = Initdata::decode(encoded).unwrap();
        assert_eq!(d.document, DOC);
        assert_eq!(d.algorithm, "sha384");
        assert_eq!(d.digest, SHA384);
        assert_eq!(d.data["policy.rego"], "package agent_policy");
    }
}

#[test]
fn apply_writes_owner_only_files_the_digest_and_the_initdata_files() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let files = parse(&user_data(&[
        ("/run/peerpod/apf.json", "{}"),
        ("/run/peerpod/initdata", PLAIN),
        ("/run/peerpod/aa.toml", "explicit"),
    ]))
    .unwrap();
    let written = apply(&files, root.path()).unwrap();
    let dir = root.path().join("run/peerpod");
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
    assert_eq!(read("apf.json"), "{}");
    assert_eq!(read("initdata"), PLAIN);
    assert_eq!(read("initdata.digest"), SHA384);
    assert_eq!(read("aa.toml"), "explicit", "user data's own file wins");
    assert_eq!(
        read("policy.rego"),
        "package agent_policy",
        "derived from [data]"
    );
    assert_eq!(written.len(), 5);
    for path in written {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn nothing_is_written_when_anything_is_wrong() {
    let root = tempfile::tempdir().unwrap();
    let files = parse(&user_data(&[
        ("/run/peerpod/apf.json", "{}"),
        ("/run/peerpod/initdata", "bm90IHRvbWw="),
    ]))
    .unwrap();
    assert!(matches!(
        apply(&files, root.path()),
        Err(UserDataError::Initdata(_))
    ));
    assert!(!root.path().join("run").exists());
}

/// A metadata server on loopback speaking enough HTTP/1.1 for IMDS clients:
/// answers each request with `answer(method, path, headers, body)` (header
/// lines lowercased; the body read to its `content-length`, so none is
/// left unread when the connection closes).
fn imds(answer: fn(&str, &str, &[String], &str) -> (u16, String)) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap_or("").to_owned(),
                parts.next().unwrap_or("").to_owned(),
            );
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                headers.push(h.trim().to_ascii_lowercase());
            }
            let length = headers
                .iter()
                .find_map(|h| h.strip_prefix("content-length:"))
                .and_then(|n| n.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let mut request_body = vec![0; length];
            if std::io::Read::read_exact(&mut reader, &mut request_body).is_err() {
                continue;
            }
            let request_body = String::from_utf8_lossy(&request_body);
            let (status, body) = answer(&method, &path, &headers, &request_body);
            let _ = write!(
                conn,
                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}")
}

#[test]
fn aws_imdsv2_is_asked_with_a_session_token() {
    let endpoint = imds(|method, path, headers, _| match (method, path) {
        ("PUT", "/latest/api/token")
            if headers
                .iter()
                .any(|h| h.starts_with("x-aws-ec2-metadata-token-ttl-seconds")) =>
        {
            (200, "tok".into())
        }
        ("GET", "/latest/user-data")
            if headers.iter().any(|h| h == "x-aws-ec2-metadata-token: tok") =>
        {
            (200, "#cloud-config\nwrite_files: []\n".into())
        }
        _ => (401, String::new()),
    });
    let source: Source = format!("aws:{}", endpoint.trim_start_matches("http:"))
        .parse()
        .unwrap();
    assert_eq!(source, Source::Aws(endpoint));
    assert_eq!(
        fetch(&source).unwrap().as_deref(),
        Some("#cloud-config\nwrite_files: []\n")
    );
}

#[test]
fn azure_imds_user_data_is_base64() {
    let endpoint = imds(|_, path, headers, _| {
        if path.starts_with("/metadata/instance/compute/userData")
            && headers.iter().any(|h| h == "metadata: true")
        {
            (200, "I2Nsb3VkLWNvbmZpZwp3cml0ZV9maWxlczogW10K".into())
        } else {
            (400, String::new())
        }
    });
    let text = fetch(&Source::Azure(endpoint)).unwrap().unwrap();
    assert_eq!(text, "#cloud-config\nwrite_files: []\n");
}

/// The IBM Cloud stub's token; lowercase, as the stub sees header lines.
const IBM_TOKEN: &str = "ibm-token-3f9c";
/// Its user data, with a marker that must never reach an error message.
const IBM_USER_DATA: &str = "#cloud-config\nwrite_files: []\n# ibm-secret-77\n";

/// IBM Cloud's flow as the documentation gives it: the token needs
/// `Metadata-Flavor: ibm` and a JSON body with `expires_in`; the
/// initialization needs the token as a Bearer, else 401.
fn ibm_stub(init: fn() -> (u16, String)) -> String {
    // A `fn` pointer cannot capture `init`: keep it per stub in a map.
    type Init = fn() -> (u16, String);
    static INITS: std::sync::Mutex<Vec<(String, Init)>> = std::sync::Mutex::new(Vec::new());
    let endpoint = imds(|method, path, headers, body| {
        let version = "version=2022-03-01";
        match (method, path.split_once('?')) {
            ("PUT", Some(("/instance_identity/v1/token", query)))
                if query == version
                    && headers.iter().any(|h| h == "metadata-flavor: ibm")
                    && serde_json::from_str::<serde_json::Value>(body)
                        .is_ok_and(|b| b["expires_in"].as_u64() == Some(300)) =>
            {
                (
                    200,
                    serde_json::json!({"access_token": IBM_TOKEN, "expires_in": 300}).to_string(),
                )
            }
            ("GET", Some(("/metadata/v1/instance/initialization", query)))
                if query == version
                    && headers
                        .iter()
                        .any(|h| *h == format!("authorization: bearer {IBM_TOKEN}")) =>
            {
                let host = headers
                    .iter()
                    .find_map(|h| h.strip_prefix("host: "))
                    .unwrap_or("");
                let inits = INITS.lock().unwrap();
                let init = inits.iter().find(|(e, _)| e.ends_with(host));
                init.map_or((500, String::new()), |(_, answer)| answer())
            }
            _ => (401, String::new()),
        }
    });
    INITS.lock().unwrap().push((endpoint.clone(), init));
    endpoint
}

#[test]
fn ibmcloud_follows_the_token_flow_to_the_user_data() {
    let endpoint = ibm_stub(|| {
        (
            200,
            serde_json::json!({"keys": [], "user_data": IBM_USER_DATA}).to_string(),
        )
    });
    for spelling in [
        format!("ibmcloud:{endpoint}"),
        format!("ibmcloud:{endpoint}/"),
        format!("ibmcloud:{}", endpoint.trim_start_matches("http:")),
    ] {
        assert_eq!(spelling.parse(), Ok(Source::IbmCloud(endpoint.clone())));
    }
    let source = Source::IbmCloud(endpoint.clone());
    assert_eq!(fetch(&source).unwrap().as_deref(), Some(IBM_USER_DATA));
    // The stub refuses the initialization without the token: the flow is
    // what got it.
    let agent = agent();
    let url = format!("{endpoint}/metadata/v1/instance/initialization?version=2022-03-01");
    assert_eq!(agent.get(&url).call().unwrap().status(), 401);
    assert_eq!(
        agent
            .get(&url)
            .header("Authorization", "Bearer another")
            .call()
            .unwrap()
            .status(),
        401
    );
    // And find() takes it from the default list's place, after sources
    // that have nothing.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let text = find(
        &[
            Source::File("/nonexistent/user-data".into()),
            Source::Aws(closed.clone()),
            Source::Azure(closed),
            source,
        ],
        Duration::from_millis(10),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(text, IBM_USER_DATA);
}

#[test]
fn ibmcloud_without_user_data_has_none() {
    for init in [
        (|| (200, r#"{"keys": []}"#.to_owned())) as fn() -> (u16, String),
        || (200, r#"{"keys": [], "user_data": null}"#.to_owned()),
        || (200, r#"{"keys": [], "user_data": ""}"#.to_owned()),
    ] {
        let endpoint = ibm_stub(init);
        assert_eq!(fetch(&Source::IbmCloud(endpoint.clone())), Ok(None));
        let e = find(
            &[Source::IbmCloud(endpoint)],
            Duration::from_millis(10),
            Duration::from_millis(30),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("IBM Cloud metadata service at") && e.ends_with(": none"),
            "{e}"
        );
    }
}

#[test]
fn ibmcloud_failures_are_clear_and_carry_no_token_or_user_data() {
    // The token is refused (the service off, or a wrong flavor).
    let refused = imds(|_, _, _, _| (403, format!("denied {IBM_TOKEN}")));
    let e = fetch(&Source::IbmCloud(refused)).unwrap_err();
    assert_eq!(e, "token request answered 403 Forbidden");

    // The token answer is not what the API gives.
    for answer in [
        "not json ibm-token-3f9c",
        r#"{"token": "ibm-token-3f9c"}"#,
        r#"{"access_token": ["ibm-token-3f9c"]}"#,
        r#"{"access_token": 3}"#,
        r#"{"access_token": "ibm token-3f9c"}"#,
        r#"{"access_token": ""}"#,
    ] {
        static ANSWER: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
        *ANSWER.lock().unwrap() = answer.to_owned();
        let endpoint = imds(|method, _, _, _| match method {
            "PUT" => (200, ANSWER.lock().unwrap().clone()),
            _ => (500, String::new()),
        });
        let e = fetch(&Source::IbmCloud(endpoint)).unwrap_err();
        assert!(e.starts_with("the token answer"), "{answer}: {e}");
        assert!(!e.contains("3f9c"), "{e}");
    }

    // The initialization fails, or is not what the API gives.
    for (init, expected) in [
        (
            (|| (500, format!("oops {IBM_USER_DATA}"))) as fn() -> (u16, String),
            "initialization answered 500 Internal Server Error",
        ),
        (
            || {
                (
                    200,
                    serde_json::json!({"user_data": [IBM_USER_DATA]}).to_string(),
                )
            },
            "the initialization answer is not JSON with a string (or absent) user_data",
        ),
        (
            || (200, format!("{{\"user_data\": \"{IBM_USER_DATA}")),
            "the initialization answer is not JSON with a string (or absent) user_data",
        ),
    ] {
        let endpoint = ibm_stub(init);
        let e = find(
            &[Source::IbmCloud(endpoint)],
            Duration::from_millis(10),
            Duration::from_millis(30),
        )
        .unwrap_err()
        .to_string();
        assert!(e.ends_with(expected), "{e}");
        assert!(!e.contains("3f9c") && !e.contains("ibm-secret"), "{e}");
    }
}

#[test]
fn a_missing_source_is_a_clear_error_after_the_wait() {
    let root = tempfile::tempdir().unwrap();
    let missing = Source::File(root.path().join("user-data"));
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let e = find(
        &[missing, Source::Aws(closed)],
        Duration::from_millis(20),
        Duration::from_millis(100),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("No user data after"), "{e}");
    assert!(
        e.contains("user-data: none") && e.contains("AWS IMDS at"),
        "{e}"
    );

    // It appears while we wait: found.
    let path = root.path().join("late");
    let writer = {
        let path = path.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(path, "#cloud-config\nwrite_files: []\n").unwrap();
        })
    };
    let text = find(
        &[Source::File(path)],
        Duration::from_millis(10),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(text.starts_with("#cloud-config"));
    writer.join().unwrap();
}

#[test]
fn sources_parse_and_bad_ones_say_what_is_accepted() {
    assert_eq!(
        "cidata".parse(),
        Ok(Source::File("/media/cidata/user-data".into()))
    );
    assert_eq!("file:/x/y".parse(), Ok(Source::File("/x/y".into())));
    assert_eq!(
        "aws".parse(),
        Ok(Source::Aws("http://169.254.169.254".into()))
    );
    assert_eq!(
        "ibmcloud".parse(),
        Ok(Source::IbmCloud("http://169.254.169.254".into()))
    );
    // The spelling `--help` shows works for every metadata service.
    assert_eq!(
        "aws:http://127.0.0.1:8080".parse(),
        Ok(Source::Aws("http://127.0.0.1:8080".into()))
    );
    assert_eq!(
        "azure:http://127.0.0.1:8080".parse(),
        Ok(Source::Azure("http://127.0.0.1:8080".into()))
    );
    // No TLS client here, no empty host, no path of one's own.
    for bad in [
        "ibmcloud:https://api.metadata.cloud.ibm.com",
        "ibmcloud:http://",
        "azure:ftp://h",
        "aws:http://h/latest",
        "aws:",
    ] {
        let e = bad.parse::<Source>().unwrap_err();
        assert!(e.contains("ibmcloud[:http://HOST:PORT]"), "{bad}: {e}");
    }
    let e = "gcp".parse::<Source>().unwrap_err();
    assert!(
        e.contains("not a user data source") && e.contains("cidata"),
        "{e}"
    );
}
