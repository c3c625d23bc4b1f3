//! The IBM Cloud test server (`providers/src/ibmcloud/testing.rs`) itself:
//! that IBM's official Python SDK takes its answers (the fidelity test,
//! driving `ibmcloud_sdk.py`), and its own behaviour over plain HTTP —
//! the query parameters VPC requires, tokens, paging, an instance's life,
//! tags and search, and scripted faults.
#![cfg(feature = "ibmcloud")]

use podvisor_providers::ibmcloud::testing::{
    Fault, IbmCloudServer, Route, ServerOptions, TEST_API_KEY, TEST_CR_TOKEN, TEST_PROFILE_ID,
};
use serde_json::{Value, json};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// The API version the tests send.
const VERSION: &str = "version=2025-12-09&generation=2";

/// An HTTPS client trusting only `server`'s CA.
fn client(server: &IbmCloudServer) -> reqwest::Client {
    let pem = std::fs::read(server.ca_file()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A token from the server's IAM for the test API key.
async fn token(server: &IbmCloudServer, http: &reqwest::Client) -> String {
    let answer: Value = http
        .post(format!("{}/identity/token", server.url()))
        .form(&[
            ("grant_type", "urn:ibm:params:oauth:grant-type:apikey"),
            ("apikey", TEST_API_KEY),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["access_token"].as_str().unwrap().to_owned()
}

/// A prototype for an instance named `name`, booting volume `volume`.
fn prototype(name: &str, volume: &str) -> Value {
    json!({
        "name": name,
        "profile": {"name": "bx2-2x8"},
        "image": {"id": "r006-image-amd64"},
        "zone": {"name": "us-south-1"},
        "vpc": {"id": "r006-vpc-test"},
        "primary_network_interface": {
            "subnet": {"id": "0717-subnet-test"},
            "security_groups": [{"id": "r006-sg-test"}],
        },
        "keys": [{"id": "r006-key-test"}],
        "user_data": "#cloud-config\n",
        "metadata_service": {"enabled": true},
        "resource_group": {"id": "rg-test-0123456789abcdef"},
        "boot_volume_attachment": {
            "volume": {"name": volume, "profile": {"name": "general-purpose"}},
            "delete_volume_on_instance_delete": true,
        },
    })
}

/// A server and a client with a token, for the HTTP tests.
struct Bed {
    server: IbmCloudServer,
    http: reqwest::Client,
    token: String,
}

impl Bed {
    async fn new() -> Self {
        let server = IbmCloudServer::start(ServerOptions::default());
        let http = client(&server);
        let token = token(&server, &http).await;
        Self {
            server,
            http,
            token,
        }
    }

    /// `method` `path` (with the VPC query appended when `path` is a VPC
    /// path), with the token: (status, headers, JSON body or Null).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let url = if path.starts_with("/v1/") {
            let sep = if path.contains('?') { '&' } else { '?' };
            format!("{}{path}{sep}{VERSION}", self.server.url())
        } else {
            format!("{}{path}", self.server.url())
        };
        let mut request = self.http.request(method, url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, headers, value)
    }

    async fn create(&self, name: &str, volume: &str) -> (u16, Value) {
        let (status, _, body) = self
            .call(
                reqwest::Method::POST,
                "/v1/instances",
                Some(prototype(name, volume)),
            )
            .await;
        (status, body)
    }
}

/// The fidelity test: IBM's Python SDKs drive the server through a whole
/// instance life (IAM with an API key and with a trusted profile, VPC
/// create / get / list with paging / delete, a name conflict, Global
/// Tagging, Global Search), parsing every answer with their models.
#[test]
fn the_python_sdk_takes_every_answer() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let probe = Command::new(&python)
        .args(["-c", "import ibm_vpc, ibm_platform_services"])
        .output();
    let missing = match &probe {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        Err(e) => Some(format!("cannot run {python}: {e}")),
    };
    if let Some(why) = missing {
        let message = format!(
            "the IBM Cloud SDK fidelity test needs IBM's Python SDKs ({why}): \
             pip install ibm-vpc ibm-platform-services (scripts/test.sh does)"
        );
        assert!(!ci, "{message}");
        eprintln!("SKIPPED: {message}");
        return;
    }

    let server = IbmCloudServer::start(ServerOptions::default());
    server.set_pending_polls(2);
    server.set_deleting_polls(2);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ibmcloud_sdk.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(server.url())
        .arg(server.ca_file())
        .args([TEST_API_KEY, TEST_PROFILE_ID, TEST_CR_TOKEN])
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("IBMCLOUD_API_KEY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ibmcloud_sdk.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("all checks passed"), "{stdout}\n{stderr}");

    // What the script did, as the server saw it.
    let counts = server.counts();
    let count = |r: Route| counts.get(&r).copied().unwrap_or(0);
    // A refused key, the key, the trusted profile.
    assert!(count(Route::Token) >= 3, "{counts:?}");
    assert_eq!(
        server.tokens_issued(),
        count(Route::Token) - 1,
        "{counts:?}"
    );
    // Two made, two refused as not unique.
    assert_eq!(count(Route::CreateInstance), 4, "{counts:?}");
    assert_eq!(count(Route::DeleteInstance), 3, "{counts:?}");
    assert_eq!(count(Route::AttachTags), 3, "{counts:?}");
    assert_eq!(count(Route::ListTags), 1, "{counts:?}");
    assert!(count(Route::Search) >= 2, "{counts:?}");
    assert!(count(Route::ListInstances) >= 4, "{counts:?}");
    assert_eq!(count(Route::GetImage), 2, "{counts:?}");
    assert_eq!(count(Route::GetProfile), 2, "{counts:?}");
    assert_eq!(count(Route::ListProfiles), 1, "{counts:?}");
    assert_eq!(count(Route::GetSubnet), 1, "{counts:?}");
    assert_eq!(count(Route::Other), 0, "{counts:?}");
    assert!(server.instances().is_empty(), "{:?}", server.instances());
    let bodies = server.create_bodies();
    assert_eq!(bodies.len(), 2);
    assert_eq!(bodies[0]["user_data"], "#cloud-config\n");
    assert_eq!(bodies[0]["metadata_service"]["enabled"], true);
    assert_eq!(
        bodies[0]["boot_volume_attachment"]["volume"]["profile"]["name"],
        "general-purpose"
    );
}

#[tokio::test]
async fn vpc_calls_need_version_and_generation() {
    let bed = Bed::new().await;
    let url = bed.server.url();
    for (query, missing) in [
        ("", "version"),
        ("?generation=2", "version"),
        ("?version=yesterday&generation=2", "version"),
        ("?version=2025-12-09", "generation"),
        ("?version=2025-12-09&generation=1", "generation"),
    ] {
        let response = bed
            .http
            .get(format!("{url}/v1/instances{query}"))
            .bearer_auth(&bed.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status_code"], 400);
        assert!(body["trace"].is_string(), "{body}");
        let error = &body["errors"][0];
        assert!(error["code"].is_string(), "{body}");
        assert!(error["message"].is_string(), "{body}");
        assert!(error["more_info"].is_string(), "{body}");
        assert_eq!(error["target"]["name"], missing, "{query}: {body}");
        assert_eq!(error["target"]["type"], "parameter");
    }
    let (status, _, body) = bed.call(reqwest::Method::GET, "/v1/instances", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total_count"], 0);
    assert_eq!(body["limit"], 50);
    assert!(body["first"]["href"].is_string());
}

#[tokio::test]
async fn iam_issues_tokens_and_every_service_wants_one() {
    let server = IbmCloudServer::start(ServerOptions::default());
    let http = client(&server);
    let url = server.url();

    // A wrong key: IAM's own error shape.
    let response = http
        .post(format!("{url}/identity/token"))
        .form(&[
            ("grant_type", "urn:ibm:params:oauth:grant-type:apikey"),
            ("apikey", "wrong"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errorCode"], "BXNIM0415E");
    assert!(body["errorMessage"].is_string());
    assert!(body["context"]["requestId"].is_string());
    assert_eq!(server.tokens_issued(), 0);

    // The trusted profile's grant.
    let answer: Value = http
        .post(format!("{url}/identity/token"))
        .form(&[
            ("grant_type", "urn:ibm:params:oauth:grant-type:cr-token"),
            ("cr_token", TEST_CR_TOKEN),
            ("profile_id", TEST_PROFILE_ID),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["token_type"], "Bearer");
    assert_eq!(answer["refresh_token"], "not_supported");
    assert_eq!(answer["expires_in"], 3600);
    let issued = answer["access_token"].as_str().unwrap();
    let parts: Vec<&str> = issued.split('.').collect();
    assert_eq!(parts.len(), 3, "{issued}");
    use base64::Engine;
    let payload: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(payload["exp"], answer["expiration"]);
    assert_eq!(
        payload["exp"].as_u64().unwrap() - payload["iat"].as_u64().unwrap(),
        3600
    );
    // A wrong profile is refused.
    let response = http
        .post(format!("{url}/identity/token"))
        .form(&[
            ("grant_type", "urn:ibm:params:oauth:grant-type:cr-token"),
            ("cr_token", TEST_CR_TOKEN),
            ("profile_id", "Profile-other"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);

    // No token, a made-up one: 401 from each service, in its shape.
    for bearer in [None, Some("eyJ.made.up")] {
        for (method, path) in [
            (reqwest::Method::GET, format!("/v1/instances?{VERSION}")),
            (reqwest::Method::GET, "/v3/tags?attached_to=x".to_owned()),
            (reqwest::Method::POST, "/v3/resources/search".to_owned()),
        ] {
            let mut request = http.request(method, format!("{url}{path}"));
            if let Some(t) = bearer {
                request = request.bearer_auth(t);
            }
            let response = request.json(&json!({})).send().await.unwrap();
            assert_eq!(response.status().as_u16(), 401, "{path}");
            let body: Value = response.json().await.unwrap();
            assert!(body["errors"][0]["code"].is_string(), "{body}");
            if path.starts_with("/v1/") {
                assert_eq!(body["errors"][0]["code"], "not_authorized");
            }
        }
    }

    // An expired token is refused.
    server.set_token_ttl(Duration::from_secs(1));
    let short = token(&server, &http).await;
    let response = http
        .get(format!("{url}/v1/instances?{VERSION}"))
        .bearer_auth(&short)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = http
        .get(format!("{url}/v1/instances?{VERSION}"))
        .bearer_auth(&short)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(server.tokens_issued(), 2);
    assert_eq!(server.count(Route::Token), 4);
}

#[tokio::test]
async fn an_instance_is_pending_then_running_then_deleting_then_gone() {
    let bed = Bed::new().await;
    bed.server.set_pending_polls(2);
    bed.server.set_deleting_polls(1);
    let (status, created) = bed.create("podvm-a-1", "pv-a-1").await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["status"], "pending");
    assert_eq!(
        created["primary_network_interface"]["primary_ip"]["address"],
        "0.0.0.0"
    );
    let id = created["id"].as_str().unwrap().to_owned();
    let crn = created["crn"].as_str().unwrap();
    assert_eq!(
        crn,
        format!(
            "crn:v1:bluemix:public:is:us-south-1:a/{}::instance:{id}",
            podvisor_providers::ibmcloud::testing::TEST_ACCOUNT
        )
    );
    let held = bed.server.instances();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].status, "pending");
    assert_eq!(held[0].address, None);
    assert_eq!(held[0].boot_volume_name, "pv-a-1");
    assert_eq!(held[0].user_data.as_deref(), Some("#cloud-config\n"));
    assert!(held[0].metadata_service_enabled);

    let path = format!("/v1/instances/{id}");
    // One read through the list, one single: both pending.
    let (_, _, list) = bed.call(reqwest::Method::GET, "/v1/instances", None).await;
    assert_eq!(list["instances"][0]["status"], "pending");
    let (_, _, one) = bed.call(reqwest::Method::GET, &path, None).await;
    assert_eq!(one["status"], "pending");
    let (_, _, one) = bed.call(reqwest::Method::GET, &path, None).await;
    assert_eq!(one["status"], "running");
    assert_eq!(
        one["primary_network_interface"]["primary_ip"]["address"],
        "127.19.0.2"
    );
    assert_eq!(
        bed.server.instances()[0].address,
        Some(Ipv4Addr::new(127, 19, 0, 2))
    );

    // A second instance takes the next address.
    bed.server.set_pending_polls(0);
    let (_, second) = bed.create("podvm-a-2", "pv-a-2").await;
    assert_eq!(second["status"], "running");
    assert_eq!(
        second["primary_network_interface"]["primary_ip"]["address"],
        "127.19.0.3"
    );

    let (status, _, _) = bed.call(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 204);
    assert_eq!(bed.server.instances()[0].status, "deleting");
    let (_, _, one) = bed.call(reqwest::Method::GET, &path, None).await;
    assert_eq!(one["status"], "deleting");
    let (status, _, gone) = bed.call(reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 404);
    assert_eq!(gone["errors"][0]["code"], "not_found");
    let (status, _, _) = bed.call(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 404);
    assert_eq!(bed.server.instances().len(), 1);
}

#[tokio::test]
async fn creates_are_validated_and_names_are_unique() {
    let bed = Bed::new().await;
    let (status, _) = bed.create("podvm-u-1", "pv-u-1").await;
    assert_eq!(status, 201);
    for (name, volume) in [("podvm-u-1", "pv-u-2"), ("podvm-u-2", "pv-u-1")] {
        let (status, body) = bed.create(name, volume).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["errors"][0]["code"], "validation_unique_failed");
    }
    let mut unknown_image = prototype("podvm-u-3", "pv-u-3");
    unknown_image["image"]["id"] = json!("r006-nope");
    let mut unknown_profile = prototype("podvm-u-3", "pv-u-3");
    unknown_profile["profile"]["name"] = json!("nope-2x8");
    let mut unknown_subnet = prototype("podvm-u-3", "pv-u-3");
    unknown_subnet["primary_network_interface"]["subnet"]["id"] = json!("0717-nope");
    let mut wrong_zone = prototype("podvm-u-3", "pv-u-3");
    wrong_zone["zone"]["name"] = json!("eu-de-1");
    let mut wrong_arch = prototype("podvm-u-3", "pv-u-3");
    wrong_arch["profile"]["name"] = json!("bz2-2x8");
    for (body, status, code) in [
        (unknown_image, 404, "image_not_found"),
        (unknown_profile, 404, "instance_profile_not_found"),
        (unknown_subnet, 404, "subnet_not_found"),
        (wrong_zone, 400, "invalid_zone"),
        (wrong_arch, 400, "validation_image_os_architecture_mismatch"),
    ] {
        let (got, _, answer) = bed
            .call(reqwest::Method::POST, "/v1/instances", Some(body))
            .await;
        assert_eq!(got, status, "{answer}");
        assert_eq!(answer["errors"][0]["code"], code, "{answer}");
    }
    // The newer network attachment form.
    let mut attachment = prototype("podvm-u-4", "pv-u-4");
    let interface = attachment
        .as_object_mut()
        .unwrap()
        .remove("primary_network_interface")
        .unwrap();
    attachment["primary_network_attachment"] = json!({"virtual_network_interface": interface});
    attachment["confidential_compute_mode"] = json!("tdx");
    attachment["enable_secure_boot"] = json!(true);
    let (status, _, body) = bed
        .call(reqwest::Method::POST, "/v1/instances", Some(attachment))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["confidential_compute_mode"], "tdx");
    assert!(body["primary_network_attachment"]["virtual_network_interface"]["id"].is_string());
    let held = bed.server.instances();
    assert_eq!(held.len(), 2);
    assert_eq!(held[1].confidential_compute_mode.as_deref(), Some("tdx"));
    assert_eq!(held[1].enable_secure_boot, Some(true));
    assert_eq!(bed.server.create_bodies().len(), 2);
}

#[tokio::test]
async fn listing_pages_with_start() {
    let bed = Bed::new().await;
    for i in 0..3 {
        let (status, _) = bed
            .create(&format!("podvm-p-{i}"), &format!("pv-p-{i}"))
            .await;
        assert_eq!(status, 201);
    }
    let (_, _, page) = bed
        .call(reqwest::Method::GET, "/v1/instances?limit=2", None)
        .await;
    assert_eq!(page["total_count"], 3);
    assert_eq!(page["limit"], 2);
    assert_eq!(page["instances"].as_array().unwrap().len(), 2);
    let next = page["next"]["href"].as_str().unwrap();
    let start = next.split("start=").nth(1).unwrap();
    let (_, _, last) = bed
        .call(
            reqwest::Method::GET,
            &format!("/v1/instances?limit=2&start={start}"),
            None,
        )
        .await;
    assert_eq!(last["instances"].as_array().unwrap().len(), 1);
    assert_eq!(last["instances"][0]["name"], "podvm-p-2");
    assert!(last.get("next").is_none(), "{last}");
    let (_, _, named) = bed
        .call(
            reqwest::Method::GET,
            "/v1/instances?name=podvm-p-1&vpc.id=r006-vpc-test",
            None,
        )
        .await;
    assert_eq!(named["total_count"], 1);
    assert_eq!(named["instances"][0]["name"], "podvm-p-1");
    let (_, _, other_vpc) = bed
        .call(
            reqwest::Method::GET,
            "/v1/instances?vpc.id=r006-other",
            None,
        )
        .await;
    assert_eq!(other_vpc["total_count"], 0);
    assert_eq!(bed.server.count(Route::ListInstances), 4);
}

#[tokio::test]
async fn tags_are_lowercased_validated_and_searched_late() {
    let bed = Bed::new().await;
    let (_, created) = bed.create("podvm-t-1", "pv-t-1").await;
    let crn = created["crn"].as_str().unwrap().to_owned();
    bed.server.set_search_lag(2);
    let (status, _, answer) = bed
        .call(
            reqwest::Method::POST,
            "/v3/tags/attach?tag_type=user",
            Some(json!({"resources": [{"resource_id": crn}], "tag_names": ["Podvisor-Node:N1"]})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["results"][0]["is_error"], false);
    assert_eq!(bed.server.instances()[0].tags, ["podvisor-node:n1"]);
    let (status, _, _) = bed
        .call(
            reqwest::Method::POST,
            "/v3/tags/attach?tag_type=user",
            Some(json!({"resources": [{"resource_id": crn}], "tag_names": ["a/b"]})),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _, _) = bed
        .call(
            reqwest::Method::POST,
            "/v3/tags/attach?tag_type=user",
            Some(json!({"resources": [{"resource_id": crn}], "tag_names": ["x".repeat(129)]})),
        )
        .await;
    assert_eq!(status, 400);
    let (_, _, tags) = bed
        .call(
            reqwest::Method::GET,
            &format!("/v3/tags?attached_to={crn}"),
            None,
        )
        .await;
    assert_eq!(tags["items"], json!([{"name": "podvisor-node:n1"}]));
    assert_eq!(tags["total_count"], 1);

    let query =
        json!({"query": "type:instance AND tags:\"podvisor-node:n1\"", "fields": ["name", "tags"]});
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (status, _, found) = bed
            .call(
                reqwest::Method::POST,
                "/v3/resources/search?limit=10",
                Some(query.clone()),
            )
            .await;
        assert_eq!(status, 200, "{found}");
        seen.push(found["items"].as_array().unwrap().len());
    }
    assert_eq!(seen, [0, 0, 1]);
    let (_, _, found) = bed
        .call(
            reqwest::Method::POST,
            "/v3/resources/search",
            Some(query.clone()),
        )
        .await;
    assert_eq!(found["items"][0]["crn"], crn.as_str());
    assert_eq!(found["items"][0]["name"], "podvm-t-1");
    assert_eq!(found["items"][0]["tags"], json!(["podvisor-node:n1"]));

    // A deleted instance still shows until it is gone.
    bed.server.set_deleting_polls(5);
    let id = created["id"].as_str().unwrap();
    bed.call(
        reqwest::Method::DELETE,
        &format!("/v1/instances/{id}"),
        None,
    )
    .await;
    let (_, _, found) = bed
        .call(reqwest::Method::POST, "/v3/resources/search", Some(query))
        .await;
    assert_eq!(found["items"].as_array().unwrap().len(), 1);
    let (status, _, _) = bed
        .call(
            reqwest::Method::POST,
            "/v3/resources/search",
            Some(json!({"query": "region:us-south"})),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn search_pages_with_a_cursor() {
    let bed = Bed::new().await;
    for i in 0..3 {
        bed.create(&format!("podvm-s-{i}"), &format!("pv-s-{i}"))
            .await;
    }
    let mut names = Vec::new();
    let mut body = json!({"query": "type:instance", "fields": ["name"]});
    for _ in 0..5 {
        let (_, _, page) = bed
            .call(
                reqwest::Method::POST,
                "/v3/resources/search?limit=2",
                Some(body.clone()),
            )
            .await;
        for item in page["items"].as_array().unwrap() {
            names.push(item["name"].as_str().unwrap().to_owned());
        }
        match page.get("search_cursor").and_then(Value::as_str) {
            Some(cursor) => body = json!({"search_cursor": cursor}),
            None => break,
        }
    }
    assert_eq!(names, ["podvm-s-0", "podvm-s-1", "podvm-s-2"]);
}

#[tokio::test]
async fn faults_answer_in_the_service_shape_or_drop_the_answer() {
    let bed = Bed::new().await;
    bed.server.fault(
        Route::CreateInstance,
        Fault::Status {
            status: 429,
            code: "too_many_requests".into(),
            retry_after: Some(3),
        },
        1,
    );
    let (status, headers, body) = bed
        .call(
            reqwest::Method::POST,
            "/v1/instances",
            Some(prototype("podvm-f-1", "pv-f-1")),
        )
        .await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "3");
    assert_eq!(body["errors"][0]["code"], "too_many_requests");
    assert!(bed.server.instances().is_empty());

    // The answer is lost, the instance made: a re-sent create conflicts.
    bed.server
        .fault(Route::CreateInstance, Fault::DropAnswer, 1);
    let (status, _, body) = bed
        .call(
            reqwest::Method::POST,
            "/v1/instances",
            Some(prototype("podvm-f-1", "pv-f-1")),
        )
        .await;
    assert_eq!(status, 502);
    assert_eq!(body, Value::Null);
    assert_eq!(bed.server.instances().len(), 1);
    let (status, body) = bed.create("podvm-f-1", "pv-f-1").await;
    assert_eq!(status, 400);
    assert_eq!(body["errors"][0]["code"], "validation_unique_failed");
    let id = bed.server.instances()[0].id.clone();

    // A closed connection: no answer, no work.
    bed.server.fault(Route::DeleteInstance, Fault::Close, 1);
    let sent = bed
        .http
        .delete(format!("{}/v1/instances/{id}?{VERSION}", bed.server.url()))
        .bearer_auth(&bed.token)
        .send()
        .await;
    assert!(sent.is_err(), "{sent:?}");
    assert_eq!(bed.server.instances().len(), 1);

    // A pending instance's delete refused, then accepted.
    bed.server.fault(
        Route::DeleteInstance,
        Fault::Status {
            status: 409,
            code: "cannot_delete_pending".into(),
            retry_after: None,
        },
        1,
    );
    let path = format!("/v1/instances/{id}");
    let (status, headers, body) = bed.call(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 409);
    assert!(headers.get("retry-after").is_none());
    assert_eq!(body["errors"][0]["code"], "cannot_delete_pending");
    let (status, _, _) = bed.call(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 204);
    assert!(bed.server.instances().is_empty());

    // IAM's and Global Search's faults are in their shapes.
    bed.server.fault(
        Route::Token,
        Fault::Status {
            status: 503,
            code: "BXNIM0005E".into(),
            retry_after: Some(1),
        },
        1,
    );
    let response = bed
        .http
        .post(format!("{}/identity/token", bed.server.url()))
        .form(&[
            ("grant_type", "urn:ibm:params:oauth:grant-type:apikey"),
            ("apikey", TEST_API_KEY),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errorCode"], "BXNIM0005E");
    bed.server.fault(
        Route::Search,
        Fault::Status {
            status: 500,
            code: "internal_error".into(),
            retry_after: None,
        },
        2,
    );
    for _ in 0..2 {
        let (status, _, body) = bed
            .call(
                reqwest::Method::POST,
                "/v3/resources/search",
                Some(json!({"query": "type:instance"})),
            )
            .await;
        assert_eq!(status, 500);
        assert_eq!(body["errors"][0]["code"], "internal_error");
    }
    let (status, _, _) = bed
        .call(
            reqwest::Method::POST,
            "/v3/resources/search",
            Some(json!({"query": "type:instance"})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(bed.server.count(Route::Search), 3);
    assert_eq!(bed.server.count(Route::DeleteInstance), 3);
    assert_eq!(bed.server.count(Route::CreateInstance), 3);
    bed.server.reset_counts();
    assert!(bed.server.counts().is_empty());
}
