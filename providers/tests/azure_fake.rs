//! The Azure test server (`providers/src/azure/testing.rs`) itself: that
//! Microsoft's official Python SDK takes its answers (the fidelity test,
//! driving `azure_sdk.py`), and its own behaviour over plain HTTP — Entra
//! ID's tokens, ARM's `api-version` and bearer checks, a VM's life through
//! its operations, power states and starts, paging, conditional creates,
//! and scripted faults.
#![cfg(feature = "azure")]

use podvisor_providers::azure::testing::{
    AzureServer, ErrorShape, Fault, Route, ServerOptions, TEST_CLIENT_ID, TEST_CLIENT_SECRET,
    TEST_FEDERATED_TOKEN, TEST_SUBSCRIPTION_ID, TEST_TENANT_ID,
};
use serde_json::{Value, json};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// The API version the tests send.
const API: &str = "api-version=2024-07-01";
/// The scope of ARM tokens.
const SCOPE: &str = "https://management.azure.com/.default";

/// An HTTPS client trusting only `server`'s CA. Panics (test setup) when
/// the CA cannot be read.
fn client(server: &AzureServer) -> reqwest::Client {
    let pem = std::fs::read(server.ca_file()).expect("the server's CA");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(cert.expect("a CA certificate")).expect("a root");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("an HTTPS client")
}

/// Posts a token request with `form` to the test tenant: (status, body).
async fn token_request(
    server: &AzureServer,
    http: &reqwest::Client,
    form: &[(&str, &str)],
) -> (u16, Value) {
    let response = http
        .post(format!(
            "{}/{TEST_TENANT_ID}/oauth2/v2.0/token",
            server.url()
        ))
        .form(form)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A token for the test service principal.
async fn token(server: &AzureServer, http: &reqwest::Client) -> String {
    let (status, answer) = token_request(
        server,
        http,
        &[
            ("client_id", TEST_CLIENT_ID),
            ("client_secret", TEST_CLIENT_SECRET),
            ("grant_type", "client_credentials"),
            ("scope", SCOPE),
        ],
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    answer["access_token"].as_str().unwrap().to_owned()
}

/// The ARM path of VM `name` in the default resource group.
fn vm_path(name: &str) -> String {
    format!(
        "/subscriptions/{TEST_SUBSCRIPTION_ID}/resourceGroups/podvisor-test-rg/providers/Microsoft.Compute/virtualMachines/{name}"
    )
}

/// A create body for VM `name` in the default options.
fn vm_body(server: &AzureServer, name: &str) -> Value {
    let o = server.options();
    json!({
        "location": o.region,
        "tags": {"podvisor-node": "n1", "podvisor-pod": name},
        "properties": {
            "hardwareProfile": {"vmSize": "Standard_D2as_v5"},
            "storageProfile": {
                "imageReference": {"id": o.images[0]},
                "osDisk": {
                    "name": format!("{name}-disk"),
                    "createOption": "FromImage",
                    "deleteOption": "Delete",
                    "managedDisk": {"storageAccountType": "Standard_LRS"},
                },
            },
            "osProfile": {
                "computerName": name,
                "adminUsername": "peerpod",
                "linuxConfiguration": {
                    "disablePasswordAuthentication": true,
                    "ssh": {"publicKeys": [{"path": "/home/peerpod/.ssh/authorized_keys", "keyData": "ssh-ed25519 AAAA test"}]},
                },
            },
            "networkProfile": {
                "networkApiVersion": "2020-11-01",
                "networkInterfaceConfigurations": [{
                    "name": format!("{name}-net"),
                    "properties": {
                        "primary": true,
                        "deleteOption": "Delete",
                        "networkSecurityGroup": {"id": o.nsg_ids[0]},
                        "ipConfigurations": [{
                            "name": "ipconfig",
                            "properties": {
                                "primary": true,
                                "subnet": {"id": o.subnet_id},
                                "publicIPAddressConfiguration": {"name": format!("{name}-ip"), "properties": {"deleteOption": "Delete"}},
                            },
                        }],
                    },
                }],
            },
            "userData": "I2Nsb3VkLWNvbmZpZwo=",
        },
    })
}

/// One answer: status, headers, JSON body (`Null` when empty or not JSON).
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The path and query of URL header `name` (on this server).
    fn link(&self, name: &str) -> String {
        let url = self.header(name).unwrap_or_else(|| panic!("no {name}"));
        let rest = url.strip_prefix("https://").unwrap();
        rest[rest.find('/').unwrap()..].to_owned()
    }
}

/// A server and a client with a token, for the HTTP tests.
struct Bed {
    server: AzureServer,
    http: reqwest::Client,
    token: String,
}

impl Bed {
    async fn new() -> Self {
        Self::with(ServerOptions::default()).await
    }

    async fn with(options: ServerOptions) -> Self {
        let server = AzureServer::start(options);
        let http = client(&server);
        let token = token(&server, &http).await;
        Self {
            server,
            http,
            token,
        }
    }

    /// `method` `path_and_query` with the token (and `body` as JSON).
    async fn send(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&Value>,
        extra: &[(&str, &str)],
    ) -> Reply {
        let mut request = self
            .http
            .request(method, format!("{}{path_and_query}", self.server.url()))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        Reply {
            status,
            headers,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
        }
    }

    /// `method` on `path` with the API version appended.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Reply {
        let sep = if path.contains('?') { '&' } else { '?' };
        self.send(method, &format!("{path}{sep}{API}"), body, &[])
            .await
    }

    async fn put(&self, name: &str) -> Reply {
        let body = vm_body(&self.server, name);
        self.call(reqwest::Method::PUT, &vm_path(name), Some(&body))
            .await
    }

    /// Reads the `Azure-AsyncOperation` of `reply` until it is not
    /// `InProgress`; returns the last status body.
    async fn wait(&self, reply: &Reply) -> Value {
        let link = reply.link("azure-asyncoperation");
        for _ in 0..50 {
            let status = self.send(reqwest::Method::GET, &link, None, &[]).await;
            assert_eq!(status.status, 200, "{}", status.body);
            if status.body["status"] != "InProgress" {
                return status.body;
            }
        }
        panic!("the operation never ended");
    }
}

/// The fidelity test: Microsoft's Python SDK drives the server through
/// tokens (a wrong secret, the secret, a federated token), VM sizes behind a
/// 429, images and the subnet, a scripted failed create, two creates its
/// poller follows, a conditional create, reads, paging, NICs and IPs, a
/// bogus token, deletes and a delete of nothing.
#[test]
fn the_python_sdk_takes_every_answer() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let probe = Command::new(&python)
        .args([
            "-c",
            "import azure.identity, azure.mgmt.compute, azure.mgmt.network",
        ])
        .output();
    let missing = match &probe {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        Err(e) => Some(format!("cannot run {python}: {e}")),
    };
    if let Some(why) = missing {
        let message = format!(
            "the Azure SDK fidelity test needs Microsoft's Python SDK ({why}): \
             pip install azure-identity azure-mgmt-compute azure-mgmt-network (scripts/test.sh does)"
        );
        assert!(!ci, "{message}");
        eprintln!("SKIPPED: {message}");
        return;
    }

    let server = AzureServer::start(ServerOptions::default());
    server.set_provisioning(3, Duration::from_millis(100));
    server.set_deleting(2, Duration::ZERO);
    server.set_max_page(1);
    server.fail_next_creates(
        1,
        "OSProvisioningTimedOut",
        "OS Provisioning for VM 'podvm' did not finish in the allotted time.",
    );
    server.fault(
        Route::ListSizes,
        Fault::Status {
            status: 429,
            code: "TooManyRequests".into(),
            retry_after: Some(1),
            shape: ErrorShape::Arm,
        },
        1,
    );
    let o = server.options().clone();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/azure_sdk.py");
    let ca = server.ca_file();
    let out = Command::new(&python)
        .arg(&script)
        .arg(server.url())
        .arg(&ca)
        .args([
            TEST_TENANT_ID,
            TEST_CLIENT_ID,
            TEST_CLIENT_SECRET,
            TEST_SUBSCRIPTION_ID,
            &o.resource_group,
            &o.region,
            &o.subnet_id,
            &o.images[0],
            TEST_FEDERATED_TOKEN,
        ])
        .env("REQUESTS_CA_BUNDLE", &ca)
        .env("SSL_CERT_FILE", &ca)
        .env_remove("AZURE_CLIENT_ID")
        .env_remove("AZURE_TENANT_ID")
        .env_remove("AZURE_AUTHORITY_HOST")
        .env_remove("AZURE_FEDERATED_TOKEN_FILE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "azure_sdk.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("all checks passed"), "{stdout}\n{stderr}");

    // What the script did, as the server saw it.
    let counts = server.counts();
    let count = |r: Route| counts.get(&r).copied().unwrap_or(0);
    // A refused secret; the secret; the federated token.
    assert_eq!(count(Route::Token), 3, "{counts:?}");
    assert_eq!(server.tokens_issued(), 2, "{counts:?}");
    assert!(count(Route::OpenIdConfiguration) >= 1, "{counts:?}");
    // The failed create, two creates, the conditional one, a bad size and
    // a missing image.
    assert_eq!(count(Route::PutVm), 6, "{counts:?}");
    // Each create's operation was read until done (3 InProgress reads).
    assert!(count(Route::OperationStatus) >= 3 * 3 + 3 * 2, "{counts:?}");
    // The SDK's VM delete poller ends on the Azure-AsyncOperation status:
    // it never reads the Location (the HTTP tests do).
    assert_eq!(count(Route::DeleteVm), 4, "{counts:?}");
    // The 429 and its retry, then the second listing.
    assert_eq!(count(Route::ListSizes), 3, "{counts:?}");
    assert!(count(Route::ListVms) >= 4, "{counts:?}");
    assert_eq!(count(Route::Other), 0, "{counts:?}");
    assert!(server.vms().is_empty(), "{:?}", server.vms());
    assert!(server.nics().is_empty(), "{:?}", server.nics());
    assert!(server.disks().is_empty(), "{:?}", server.disks());
    assert!(server.public_ips().is_empty(), "{:?}", server.public_ips());
    let bodies = server.put_bodies();
    assert_eq!(bodies.len(), 3);
    assert_eq!(bodies[0]["properties"]["userData"], "I2Nsb3VkLWNvbmZpZwo=");
    assert_eq!(
        bodies[1]["properties"]["securityProfile"]["securityType"],
        "ConfidentialVM"
    );
}

#[tokio::test]
async fn entra_issues_tokens_and_refuses_in_its_own_words() {
    let server = AzureServer::start(ServerOptions::default());
    let http = client(&server);
    let url = server.url();
    let secret = |s: &'static str| {
        [
            ("client_id", TEST_CLIENT_ID),
            ("client_secret", s),
            ("grant_type", "client_credentials"),
            ("scope", SCOPE),
        ]
    };

    // The OpenID configuration MSAL reads first names this server.
    let config: Value = http
        .get(format!(
            "{url}/{TEST_TENANT_ID}/v2.0/.well-known/openid-configuration"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        config["token_endpoint"],
        format!("{url}/{TEST_TENANT_ID}/oauth2/v2.0/token")
    );
    assert!(config["authorization_endpoint"].is_string(), "{config}");
    assert!(config["issuer"].is_string(), "{config}");
    let response = http
        .get(format!(
            "{url}/other-tenant/v2.0/.well-known/openid-configuration"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_tenant");
    assert_eq!(body["error_codes"], json!([90002]));

    // A wrong secret: 401 invalid_client AADSTS7000215.
    let (status, body) = token_request(&server, &http, &secret("wrong")).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_codes"], json!([7_000_215]));
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215: Invalid client secret provided."),
        "{body}"
    );
    assert!(body["trace_id"].is_string() && body["correlation_id"].is_string());

    // The secret: a JWT-shaped bearer token for an hour.
    let (status, body) = token_request(&server, &http, &secret(TEST_CLIENT_SECRET)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["ext_expires_in"], 3600);
    assert_eq!(body["access_token"].as_str().unwrap().split('.').count(), 3);

    // A federated token (workload identity).
    let (status, body) = token_request(
        &server,
        &http,
        &[
            ("client_assertion", TEST_FEDERATED_TOKEN),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_id", TEST_CLIENT_ID),
            ("grant_type", "client_credentials"),
            ("scope", SCOPE),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = token_request(
        &server,
        &http,
        &[
            ("client_assertion", "eyJ.other.token"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_id", TEST_CLIENT_ID),
            ("grant_type", "client_credentials"),
            ("scope", SCOPE),
        ],
    )
    .await;
    assert_eq!((status, &body["error"]), (400, &json!("invalid_client")));
    assert_eq!(body["error_codes"], json!([700_211]));

    // No credential, an unknown client, a scope without /.default, no scope.
    for (form, status, error, code) in [
        (
            vec![
                ("client_id", TEST_CLIENT_ID),
                ("grant_type", "client_credentials"),
                ("scope", SCOPE),
            ],
            401,
            "invalid_client",
            7_000_216,
        ),
        (
            vec![
                ("client_id", "00000000-0000-0000-0000-000000000000"),
                ("client_secret", TEST_CLIENT_SECRET),
                ("grant_type", "client_credentials"),
                ("scope", SCOPE),
            ],
            400,
            "unauthorized_client",
            700_016,
        ),
        (
            vec![
                ("client_id", TEST_CLIENT_ID),
                ("client_secret", TEST_CLIENT_SECRET),
                ("grant_type", "client_credentials"),
                ("scope", "https://management.azure.com/user_impersonation"),
            ],
            400,
            "invalid_scope",
            1_002_012,
        ),
        (
            vec![
                ("client_id", TEST_CLIENT_ID),
                ("client_secret", TEST_CLIENT_SECRET),
                ("grant_type", "client_credentials"),
            ],
            400,
            "invalid_request",
            900_144,
        ),
    ] {
        let (got, body) = token_request(&server, &http, &form).await;
        assert_eq!(got, status, "{body}");
        assert_eq!(body["error"], error, "{body}");
        assert_eq!(body["error_codes"], json!([code]), "{body}");
    }

    // An unknown tenant.
    let response = http
        .post(format!("{url}/other-tenant/oauth2/v2.0/token"))
        .form(&secret(TEST_CLIENT_SECRET))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(body["error_codes"], json!([90002]));

    assert_eq!(server.tokens_issued(), 2);
    assert_eq!(server.count(Route::Token), 9);
    assert_eq!(server.count(Route::OpenIdConfiguration), 2);
}

#[tokio::test]
async fn arm_wants_an_api_version_and_a_live_token_for_arm() {
    let bed = Bed::new().await;
    let url = bed.server.url();
    let list = format!(
        "/subscriptions/{TEST_SUBSCRIPTION_ID}/resourceGroups/podvisor-test-rg/providers/Microsoft.Compute/virtualMachines"
    );

    // The api-version: missing, malformed, a preview.
    let reply = bed.send(reqwest::Method::GET, &list, None, &[]).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["error"]["code"], "MissingApiVersionParameter");
    assert_eq!(
        reply.body["error"]["message"],
        "The api-version query parameter (?api-version=) is required for all requests."
    );
    let reply = bed
        .send(
            reqwest::Method::GET,
            &format!("{list}?api-version=latest"),
            None,
            &[],
        )
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["error"]["code"], "InvalidApiVersionParameter");
    let reply = bed
        .send(
            reqwest::Method::GET,
            &format!("{list}?api-version=2025-01-01-preview"),
            None,
            &[(
                "x-ms-correlation-request-id",
                "c0ffee00-0000-4000-8000-000000000001",
            )],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["value"], json!([]));
    // Every answer is traceable, and says what is left of the limits.
    assert!(reply.header("x-ms-request-id").is_some());
    assert_eq!(
        reply.header("x-ms-correlation-request-id"),
        Some("c0ffee00-0000-4000-8000-000000000001")
    );
    assert_eq!(
        reply.header("x-ms-ratelimit-remaining-subscription-reads"),
        Some("1199")
    );
    assert_eq!(
        reply.header("x-ms-ratelimit-remaining-resource"),
        Some("Microsoft.Compute/HighCostGet3Min;1199,Microsoft.Compute/HighCostGet30Min;1199")
    );

    // No token, a malformed header, a token never issued.
    for (authorization, code) in [
        (None, "AuthenticationFailed"),
        (Some("Basic eHg6eXk="), "AuthenticationFailed"),
        (
            Some("Bearer eyJ.never.issued"),
            "InvalidAuthenticationToken",
        ),
    ] {
        let mut request = bed.http.get(format!("{url}{list}?{API}"));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401);
        let challenge = response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            challenge.starts_with(&format!(
                "Bearer authorization_uri=\"https://login.microsoftonline.com/{TEST_TENANT_ID}\", error=\"invalid_token\", error_description=\""
            )),
            "{challenge}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
    }

    // A token for another resource, an expired one.
    let (_, other) = token_request(
        &bed.server,
        &bed.http,
        &[
            ("client_id", TEST_CLIENT_ID),
            ("client_secret", TEST_CLIENT_SECRET),
            ("grant_type", "client_credentials"),
            ("scope", "https://graph.microsoft.com/.default"),
        ],
    )
    .await;
    let response = bed
        .http
        .get(format!("{url}{list}?{API}"))
        .bearer_auth(other["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "InvalidAuthenticationTokenAudience");
    bed.server.set_token_ttl(Duration::from_secs(1));
    let short = token(&bed.server, &bed.http).await;
    let ok = bed
        .http
        .get(format!("{url}{list}?{API}"))
        .bearer_auth(&short)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = bed
        .http
        .get(format!("{url}{list}?{API}"))
        .bearer_auth(&short)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ExpiredAuthenticationToken");

    // Another subscription, another resource group, an unknown type.
    let reply = bed
        .call(
            reqwest::Method::GET,
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/podvisor-test-rg/providers/Microsoft.Compute/virtualMachines",
            None,
        )
        .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body["error"]["code"], "SubscriptionNotFound");
    let reply = bed
        .call(
            reqwest::Method::GET,
            &format!("/subscriptions/{TEST_SUBSCRIPTION_ID}/resourceGroups/other-rg/providers/Microsoft.Compute/virtualMachines/x"),
            None,
        )
        .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body["error"]["code"], "ResourceGroupNotFound");
    let reply = bed
        .call(
            reqwest::Method::GET,
            &format!("/subscriptions/{TEST_SUBSCRIPTION_ID}/resourceGroups/podvisor-test-rg/providers/Microsoft.Compute/availabilitySets/x"),
            None,
        )
        .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body["error"]["code"], "InvalidResourceType");
    assert_eq!(bed.server.count(Route::Other), 1);

    // No rate-limit headers when the test says so.
    bed.server.set_ratelimit_remaining(None);
    let reply = bed.call(reqwest::Method::GET, &list, None).await;
    assert!(
        reply
            .header("x-ms-ratelimit-remaining-subscription-reads")
            .is_none()
    );
}

#[tokio::test]
async fn a_vm_is_created_polled_read_and_deleted_with_what_it_made() {
    let bed = Bed::new().await;
    bed.server.set_provisioning(2, Duration::ZERO);
    let created = bed.put("podvm-a").await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.body["properties"]["provisioningState"], "Creating");
    assert_eq!(created.body["name"], "podvm-a");
    assert_eq!(created.body["type"], "Microsoft.Compute/virtualMachines");
    assert_eq!(created.body["id"], vm_path("podvm-a"));
    assert_eq!(created.body["tags"]["podvisor-pod"], "podvm-a");
    assert!(created.body["properties"]["vmId"].as_str().unwrap().len() == 36);
    assert!(created.body["properties"]["timeCreated"].is_string());
    assert!(created.body["properties"].get("userData").is_none());
    assert_eq!(
        created.body["properties"]["networkProfile"]["networkInterfaces"][0],
        json!({
            "id": format!("/subscriptions/{TEST_SUBSCRIPTION_ID}/resourceGroups/podvisor-test-rg/providers/Microsoft.Network/networkInterfaces/podvm-a-net"),
            "properties": {"primary": true, "deleteOption": "Delete"},
        })
    );
    let operation = created.link("azure-asyncoperation");
    assert!(
        operation.starts_with(&format!(
            "/subscriptions/{TEST_SUBSCRIPTION_ID}/providers/Microsoft.Compute/locations/eastus/operations/"
        )),
        "{operation}"
    );
    assert!(operation.contains("api-version=2024-07-01"), "{operation}");
    assert!(created.header("location").is_none());
    assert!(created.header("retry-after").is_none());
    assert_eq!(
        created.header("x-ms-ratelimit-remaining-resource"),
        Some("Microsoft.Compute/PutVM3Min;1199,Microsoft.Compute/PutVM30Min;1199")
    );
    assert_eq!(
        created.header("x-ms-ratelimit-remaining-subscription-writes"),
        Some("1199")
    );

    let vms = bed.server.vms();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].provisioning_state, "Creating");
    assert_eq!(vms[0].private_ip, Ipv4Addr::new(127, 23, 0, 2));
    assert_eq!(vms[0].public_ip, Some(Ipv4Addr::new(127, 24, 0, 2)));
    assert_eq!(vms[0].user_data.as_deref(), Some("I2Nsb3VkLWNvbmZpZwo="));
    assert_eq!(vms[0].size, "Standard_D2as_v5");
    assert_eq!(vms[0].tags["podvisor-node"], "n1");
    assert_eq!(vms[0].body, vm_body(&bed.server, "podvm-a"));
    assert_eq!(bed.server.nics(), ["podvm-a-net"]);
    assert_eq!(bed.server.disks(), ["podvm-a-disk"]);
    assert_eq!(bed.server.public_ips(), ["podvm-a-ip"]);

    // Two reads in progress (one of the VM itself), then the end.
    let first = bed.send(reqwest::Method::GET, &operation, None, &[]).await;
    assert_eq!(first.body["status"], "InProgress");
    assert_eq!(
        first.body["name"],
        operation
            .split('/')
            .next_back()
            .unwrap()
            .split('?')
            .next()
            .unwrap()
    );
    assert!(first.body["startTime"].is_string());
    assert!(first.body.get("endTime").is_none());
    let read = bed
        .call(reqwest::Method::GET, &vm_path("podvm-a"), None)
        .await;
    assert_eq!(read.body["properties"]["provisioningState"], "Creating");
    let done = bed.send(reqwest::Method::GET, &operation, None, &[]).await;
    assert_eq!(done.body["status"], "Succeeded", "{}", done.body);
    assert!(done.body["endTime"].is_string());

    // Reads: the VM (names are case-insensitive), with userData on request.
    let read = bed
        .call(reqwest::Method::GET, &vm_path("PODVM-A"), None)
        .await;
    assert_eq!(read.status, 200);
    assert_eq!(read.body["name"], "podvm-a");
    assert_eq!(read.body["properties"]["provisioningState"], "Succeeded");
    let read = bed
        .call(
            reqwest::Method::GET,
            &format!("{}?$expand=userData", vm_path("podvm-a")),
            None,
        )
        .await;
    assert_eq!(read.body["properties"]["userData"], "I2Nsb3VkLWNvbmZpZwo=");
    let rg =
        format!("/subscriptions/{TEST_SUBSCRIPTION_ID}/resourceGroups/podvisor-test-rg/providers");
    let nic = bed
        .call(
            reqwest::Method::GET,
            &format!("{rg}/Microsoft.Network/networkInterfaces/podvm-a-net"),
            None,
        )
        .await;
    assert_eq!(nic.status, 200, "{}", nic.body);
    let ipconfig = &nic.body["properties"]["ipConfigurations"][0];
    assert_eq!(ipconfig["name"], "ipconfig");
    assert_eq!(ipconfig["properties"]["privateIPAddress"], "127.23.0.2");
    assert_eq!(
        ipconfig["properties"]["subnet"]["id"],
        bed.server.options().subnet_id
    );
    assert_eq!(
        ipconfig["properties"]["publicIPAddress"]["id"],
        format!(
            "/subscriptions/{TEST_SUBSCRIPTION_ID}/resourceGroups/podvisor-test-rg/providers/Microsoft.Network/publicIPAddresses/podvm-a-ip"
        )
    );
    assert_eq!(
        nic.body["properties"]["virtualMachine"]["id"],
        vm_path("podvm-a")
    );
    assert_eq!(
        nic.body["properties"]["networkSecurityGroup"]["id"],
        bed.server.options().nsg_ids[0]
    );
    let ip = bed
        .call(
            reqwest::Method::GET,
            &format!("{rg}/Microsoft.Network/publicIPAddresses/podvm-a-ip"),
            None,
        )
        .await;
    assert_eq!(ip.body["properties"]["ipAddress"], "127.24.0.2");
    assert_eq!(ip.body["properties"]["publicIPAllocationMethod"], "Static");
    let disk = bed
        .call(
            reqwest::Method::GET,
            &format!("{rg}/Microsoft.Compute/disks/podvm-a-disk"),
            None,
        )
        .await;
    assert_eq!(disk.body["properties"]["diskState"], "Attached");
    assert_eq!(disk.body["managedBy"], vm_path("podvm-a"));

    // The delete: 202 with both headers; Deleting until its reads are done.
    let deleted = bed
        .call(reqwest::Method::DELETE, &vm_path("podvm-a"), None)
        .await;
    assert_eq!(deleted.status, 202);
    assert_eq!(deleted.body, Value::Null);
    assert_eq!(
        deleted.header("x-ms-ratelimit-remaining-subscription-deletes"),
        Some("1199")
    );
    let monitor = deleted.link("location");
    assert!(monitor.contains("monitor=true"), "{monitor}");
    let status = deleted.link("azure-asyncoperation");
    assert_eq!(
        monitor.split('?').next(),
        status.split('?').next(),
        "one operation"
    );
    assert_eq!(bed.server.vms()[0].provisioning_state, "Deleting");
    let reply = bed.send(reqwest::Method::GET, &monitor, None, &[]).await;
    assert_eq!(reply.status, 202);
    assert!(reply.header("location").is_some());
    let reply = bed.send(reqwest::Method::GET, &monitor, None, &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(bed.server.count(Route::OperationResult), 2);
    let reply = bed.send(reqwest::Method::GET, &status, None, &[]).await;
    assert_eq!(reply.body["status"], "Succeeded");

    // Gone, with its NIC, disk and IP; a delete of nothing is 204.
    let gone = bed
        .call(reqwest::Method::GET, &vm_path("podvm-a"), None)
        .await;
    assert_eq!(gone.status, 404);
    assert_eq!(
        gone.body["error"],
        json!({
            "code": "ResourceNotFound",
            "message": "The Resource 'Microsoft.Compute/virtualMachines/podvm-a' under resource group 'podvisor-test-rg' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix",
        })
    );
    assert!(bed.server.vms().is_empty());
    assert!(bed.server.nics().is_empty());
    assert!(bed.server.disks().is_empty());
    assert!(bed.server.public_ips().is_empty());
    let nic = bed
        .call(
            reqwest::Method::GET,
            &format!("{rg}/Microsoft.Network/networkInterfaces/podvm-a-net"),
            None,
        )
        .await;
    assert_eq!(nic.status, 404);
    let again = bed
        .call(reqwest::Method::DELETE, &vm_path("podvm-a"), None)
        .await;
    assert_eq!(again.status, 204);
    assert_eq!(again.body, Value::Null);

    // The freed addresses are handed out again.
    let next = bed.put("podvm-b").await;
    assert_eq!(next.status, 201);
    assert_eq!(bed.server.vms()[0].private_ip, Ipv4Addr::new(127, 23, 0, 2));
}

#[tokio::test]
async fn detached_resources_outlive_their_vm() {
    let bed = Bed::new().await;
    bed.server.set_deleting(0, Duration::ZERO);
    // CRP's default deleteOption is Detach.
    let mut body = vm_body(&bed.server, "podvm-d");
    let properties = &mut body["properties"];
    properties["storageProfile"]["osDisk"]
        .as_object_mut()
        .unwrap()
        .remove("deleteOption");
    properties["networkProfile"]["networkInterfaceConfigurations"][0]["properties"]["deleteOption"] =
        json!("Detach");
    let created = bed
        .call(reqwest::Method::PUT, &vm_path("podvm-d"), Some(&body))
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(
        created.body["properties"]["storageProfile"]["osDisk"]["deleteOption"],
        "Detach"
    );
    let deleted = bed
        .call(reqwest::Method::DELETE, &vm_path("podvm-d"), None)
        .await;
    assert_eq!(deleted.status, 202);
    assert!(bed.server.vms().is_empty());
    assert_eq!(bed.server.nics(), ["podvm-d-net"]);
    assert_eq!(bed.server.disks(), ["podvm-d-disk"]);
    // The public IP went (its deleteOption was Delete).
    assert!(bed.server.public_ips().is_empty());
    let disk = bed
        .call(
            reqwest::Method::GET,
            &format!("/subscriptions/{TEST_SUBSCRIPTION_ID}/resourceGroups/podvisor-test-rg/providers/Microsoft.Compute/disks/podvm-d-disk"),
            None,
        )
        .await;
    assert_eq!(disk.body["properties"]["diskState"], "Unattached");
    // A create naming the kept disk is refused.
    let again = bed
        .call(reqwest::Method::PUT, &vm_path("podvm-d"), Some(&body))
        .await;
    assert_eq!(again.status, 409, "{}", again.body);
    assert_eq!(again.body["error"]["code"], "ConflictingUserInput");
}

#[tokio::test]
async fn conditional_creates_updates_and_conflicts() {
    let bed = Bed::new().await;
    bed.server.set_provisioning(0, Duration::ZERO);
    let created = bed.put("podvm-c").await;
    assert_eq!(created.status, 201);
    // If-None-Match: * on an existing VM.
    let body = vm_body(&bed.server, "podvm-c");
    let conditional = bed
        .send(
            reqwest::Method::PUT,
            &format!("{}?{API}", vm_path("podvm-c")),
            Some(&body),
            &[("if-none-match", "*")],
        )
        .await;
    assert_eq!(conditional.status, 412, "{}", conditional.body);
    assert_eq!(conditional.body["error"]["code"], "PreconditionFailed");
    // Without it: an update (tags replaced), 200 with its operation.
    let mut update = body.clone();
    update["tags"] = json!({"podvisor-node": "n2"});
    let updated = bed
        .call(reqwest::Method::PUT, &vm_path("podvm-c"), Some(&update))
        .await;
    assert_eq!(updated.status, 200, "{}", updated.body);
    assert_eq!(updated.body["properties"]["provisioningState"], "Updating");
    assert!(updated.header("azure-asyncoperation").is_some());
    assert_eq!(bed.server.vms()[0].tags["podvisor-node"], "n2");
    assert_eq!(bed.server.vms()[0].provisioning_state, "Succeeded");
    assert_eq!(bed.server.put_bodies().len(), 2);
    // Another image is not an update CRP takes.
    let mut other = body.clone();
    other["properties"]["storageProfile"]["imageReference"]["id"] =
        json!(bed.server.options().images[1]);
    let refused = bed
        .call(reqwest::Method::PUT, &vm_path("podvm-c"), Some(&other))
        .await;
    assert_eq!(refused.status, 409);
    assert_eq!(refused.body["error"]["code"], "PropertyChangeNotAllowed");

    // A delete preempts a create in progress; a PUT on a VM being deleted
    // is refused; a second delete joins the first.
    bed.server.set_provisioning(5, Duration::ZERO);
    bed.server.set_deleting(5, Duration::ZERO);
    let created = bed.put("podvm-p").await;
    assert_eq!(created.status, 201);
    let deleted = bed
        .call(reqwest::Method::DELETE, &vm_path("podvm-p"), None)
        .await;
    assert_eq!(deleted.status, 202);
    let preempted = bed.wait(&created).await;
    assert_eq!(preempted["status"], "Failed");
    assert_eq!(preempted["error"]["code"], "OperationPreempted");
    let put = bed.put("podvm-p").await;
    assert_eq!(put.status, 409);
    assert_eq!(put.body["error"]["code"], "OperationNotAllowed");
    assert!(
        put.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("since the VM is marked for deletion"),
        "{}",
        put.body
    );
    let again = bed
        .call(reqwest::Method::DELETE, &vm_path("podvm-p"), None)
        .await;
    assert_eq!(again.status, 202);
    assert_eq!(
        again.link("azure-asyncoperation").split('?').next(),
        deleted.link("azure-asyncoperation").split('?').next()
    );
    assert_eq!(bed.wait(&deleted).await["status"], "Succeeded");
    assert_eq!(bed.server.vms().len(), 1);
}

#[tokio::test]
async fn creates_are_checked_before_anything_is_made() {
    let bed = Bed::new().await;
    let o = bed.server.options().clone();
    let base = vm_body(&bed.server, "podvm-v");
    let with = |pointer: &str, value: Value| {
        let mut body = base.clone();
        *body.pointer_mut(pointer).unwrap() = value;
        body
    };
    let ip_properties = "/properties/networkProfile/networkInterfaceConfigurations/0/properties";
    for (body, status, code, target) in [
        (
            with(
                "/properties/hardwareProfile/vmSize",
                json!("Standard_NoSuch_v9"),
            ),
            400,
            "InvalidParameter",
            Some("vmSize"),
        ),
        (
            with(
                "/properties/storageProfile/imageReference/id",
                json!(format!("{}-gone", o.images[0])),
            ),
            404,
            "NotFound",
            None,
        ),
        (
            with(
                "/properties/storageProfile/imageReference/id",
                json!(o.images[1].replace("1.0.0", "9.9.9")),
            ),
            404,
            "GalleryImageNotFound",
            Some("imageReference"),
        ),
        (
            with(
                &format!("{ip_properties}/ipConfigurations/0/properties/subnet/id"),
                json!(o.subnet_id.replace("default", "other")),
            ),
            400,
            "InvalidResourceReference",
            None,
        ),
        (
            with(
                &format!("{ip_properties}/networkSecurityGroup/id"),
                json!(o.nsg_ids[0].replace("podvisor-test-nsg", "other")),
            ),
            400,
            "InvalidResourceReference",
            None,
        ),
        (
            with("/location", json!("westeurope")),
            400,
            "LocationNotAvailableForResourceType",
            None,
        ),
        (
            with("/properties/userData", json!("not base64!")),
            400,
            "InvalidParameter",
            Some("userData"),
        ),
        (
            with("/properties/userData", json!("A".repeat(87_384))),
            400,
            "InvalidParameter",
            Some("userData"),
        ),
        (
            with("/tags", json!({"n": 1})),
            400,
            "InvalidRequestContent",
            None,
        ),
        (
            with("/properties/networkProfile", json!({})),
            400,
            "InvalidParameter",
            Some("networkProfile"),
        ),
    ] {
        let reply = bed
            .call(reqwest::Method::PUT, &vm_path("podvm-v"), Some(&body))
            .await;
        assert_eq!(reply.status, status, "{}", reply.body);
        assert_eq!(reply.body["error"]["code"], code, "{}", reply.body);
        assert_eq!(
            reply.body["error"]["target"].as_str(),
            target,
            "{}",
            reply.body
        );
    }
    // 64 KB of user data (87380 base64 characters) is taken.
    let largest = with(
        "/properties/userData",
        json!(base64_of(&vec![b'x'; 65_535])),
    );
    // Not JSON; not an object.
    let reply = bed
        .http
        .put(format!("{}{}?{API}", bed.server.url(), vm_path("podvm-v")))
        .bearer_auth(&bed.token)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status().as_u16(), 415);
    let reply = bed
        .call(reqwest::Method::PUT, &vm_path("podvm-v"), Some(&json!([1])))
        .await;
    assert_eq!(reply.body["error"]["code"], "InvalidRequestContent");
    assert!(bed.server.vms().is_empty());
    assert!(bed.server.nics().is_empty());
    assert!(bed.server.disks().is_empty());
    assert!(bed.server.put_bodies().is_empty());
    let reply = bed
        .call(reqwest::Method::PUT, &vm_path("podvm-v"), Some(&largest))
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
}

/// Standard base64 of `bytes`.
fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn listing_pages_with_next_link() {
    let bed = Bed::new().await;
    for name in ["podvm-l-2", "podvm-l-0", "podvm-l-1"] {
        assert_eq!(bed.put(name).await.status, 201);
    }
    bed.server.set_max_page(2);
    let list = format!(
        "/subscriptions/{TEST_SUBSCRIPTION_ID}/resourceGroups/podvisor-test-rg/providers/Microsoft.Compute/virtualMachines"
    );
    let first = bed.call(reqwest::Method::GET, &list, None).await;
    let names = |reply: &Reply| -> Vec<String> {
        reply.body["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|vm| vm["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&first), ["podvm-l-0", "podvm-l-1"]);
    let next = first.body["nextLink"].as_str().unwrap();
    assert!(
        next.starts_with(&format!("{}{list}?", bed.server.url())),
        "{next}"
    );
    assert!(next.contains("api-version=2024-07-01"), "{next}");
    assert!(next.contains("$skiptoken="), "{next}");
    let path = &next[bed.server.url().len()..];
    let second = bed.send(reqwest::Method::GET, path, None, &[]).await;
    assert_eq!(names(&second), ["podvm-l-2"]);
    assert!(second.body.get("nextLink").is_none(), "{}", second.body);
    // The subscription's listing holds them too.
    let all = bed
        .call(
            reqwest::Method::GET,
            &format!(
                "/subscriptions/{TEST_SUBSCRIPTION_ID}/providers/Microsoft.Compute/virtualMachines"
            ),
            None,
        )
        .await;
    assert_eq!(names(&all).len(), 2);
    assert!(all.body["nextLink"].is_string());
    assert_eq!(bed.server.count(Route::ListVms), 3);
}

#[tokio::test]
async fn scripted_creates_fail_and_operations_take_their_time() {
    let bed = Bed::new().await;
    bed.server.fail_next_creates(
        1,
        "AllocationFailed",
        "Allocation failed. We do not have sufficient capacity for the requested VM size in this region.",
    );
    let created = bed.put("podvm-f").await;
    assert_eq!(created.status, 201);
    let end = bed.wait(&created).await;
    assert_eq!(end["status"], "Failed");
    assert_eq!(end["error"]["code"], "AllocationFailed");
    assert!(end["endTime"].is_string());
    let read = bed
        .call(reqwest::Method::GET, &vm_path("podvm-f"), None)
        .await;
    assert_eq!(read.body["properties"]["provisioningState"], "Failed");
    assert_eq!(bed.server.vms()[0].provisioning_state, "Failed");
    // Only the next one: the one after succeeds.
    let created = bed.put("podvm-g").await;
    assert_eq!(bed.wait(&created).await["status"], "Succeeded");

    // Time as well as reads; Retry-After on the way.
    bed.server.set_provisioning(0, Duration::from_millis(300));
    bed.server.set_lro_retry_after(Some(2));
    let created = bed.put("podvm-t").await;
    assert_eq!(created.header("retry-after"), Some("2"));
    let link = created.link("azure-asyncoperation");
    let reply = bed.send(reqwest::Method::GET, &link, None, &[]).await;
    assert_eq!(reply.body["status"], "InProgress");
    assert_eq!(reply.header("retry-after"), Some("2"));
    assert_eq!(
        reply.header("x-ms-ratelimit-remaining-resource"),
        Some("Microsoft.Compute/GetOperation3Min;1199,Microsoft.Compute/GetOperation30Min;1199")
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let reply = bed.send(reqwest::Method::GET, &link, None, &[]).await;
    assert_eq!(reply.body["status"], "Succeeded");
    assert!(reply.header("retry-after").is_none());
    let deleted = bed
        .call(reqwest::Method::DELETE, &vm_path("podvm-t"), None)
        .await;
    assert_eq!(deleted.header("retry-after"), Some("2"));
    // An unknown operation.
    let reply = bed
        .call(
            reqwest::Method::GET,
            &format!("/subscriptions/{TEST_SUBSCRIPTION_ID}/providers/Microsoft.Compute/locations/eastus/operations/00000000-0000-0000-0000-000000000000"),
            None,
        )
        .await;
    assert_eq!(reply.status, 404);
}

#[tokio::test]
async fn sizes_images_and_the_subnet() {
    let bed = Bed::new().await;
    let o = bed.server.options().clone();
    let sizes = bed
        .call(
            reqwest::Method::GET,
            &format!("/subscriptions/{TEST_SUBSCRIPTION_ID}/providers/Microsoft.Compute/locations/eastus/vmSizes"),
            None,
        )
        .await;
    assert_eq!(sizes.status, 200);
    assert_eq!(sizes.body["value"].as_array().unwrap().len(), o.sizes.len());
    assert_eq!(
        sizes.body["value"][0],
        json!({
            "name": "Standard_D2as_v5",
            "numberOfCores": 2,
            "osDiskSizeInMB": 1_047_552,
            "resourceDiskSizeInMB": 0,
            "memoryInMB": 8192,
            "maxDataDiskCount": 4,
        })
    );
    for image in &o.images {
        let reply = bed.call(reqwest::Method::GET, image, None).await;
        assert_eq!(reply.status, 200, "{image}: {}", reply.body);
        assert_eq!(reply.body["id"], image.as_str());
        assert_eq!(reply.body["properties"]["provisioningState"], "Succeeded");
        let reply = bed
            .call(
                reqwest::Method::GET,
                &image
                    .to_uppercase()
                    .replace("SUBSCRIPTIONS", "subscriptions"),
                None,
            )
            .await;
        assert_eq!(reply.status, 200, "case-insensitive {image}");
    }
    let reply = bed
        .call(reqwest::Method::GET, &format!("{}-gone", o.images[0]), None)
        .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body["error"]["code"], "ResourceNotFound");
    let subnet = bed.call(reqwest::Method::GET, &o.subnet_id, None).await;
    assert_eq!(subnet.status, 200);
    assert_eq!(subnet.body["name"], "default");
    assert_eq!(subnet.body["properties"]["addressPrefix"], "127.23.0.0/24");
    let other = bed
        .call(
            reqwest::Method::GET,
            &o.subnet_id.replace("default", "other"),
            None,
        )
        .await;
    assert_eq!(other.status, 404);
    assert_eq!(bed.server.count(Route::GetImage), 5);
    assert_eq!(bed.server.count(Route::GetSubnet), 2);
}

#[tokio::test]
async fn faults_answer_in_the_shape_asked_or_lose_the_answer() {
    let bed = Bed::new().await;
    for (shape, code) in [
        (ErrorShape::Arm, "TooManyRequests"),
        (ErrorShape::Bare, "OperationNotAllowed"),
    ] {
        bed.server.fault(
            Route::PutVm,
            Fault::Status {
                status: 429,
                code: code.into(),
                retry_after: Some(17),
                shape,
            },
            1,
        );
        let reply = bed.put("podvm-x").await;
        assert_eq!(reply.status, 429);
        assert_eq!(reply.header("retry-after"), Some("17"));
        assert!(reply.header("x-ms-ratelimit-remaining-resource").is_some());
        let got = match shape {
            ErrorShape::Arm => &reply.body["error"]["code"],
            ErrorShape::Bare => &reply.body["code"],
        };
        assert_eq!(got, code, "{}", reply.body);
        assert!(bed.server.vms().is_empty());
    }

    // The answer is lost, the VM made: a conditional retry sees it.
    bed.server.fault(Route::PutVm, Fault::DropAnswer, 1);
    let reply = bed.put("podvm-x").await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.body, Value::Null);
    assert_eq!(bed.server.vms().len(), 1);
    assert_eq!(bed.server.nics(), ["podvm-x-net"]);
    let retry = bed
        .send(
            reqwest::Method::PUT,
            &format!("{}?{API}", vm_path("podvm-x")),
            Some(&vm_body(&bed.server, "podvm-x")),
            &[("if-none-match", "*")],
        )
        .await;
    assert_eq!(retry.status, 412);

    // A closed connection: no answer, no work.
    bed.server.fault(Route::DeleteVm, Fault::Close, 1);
    let sent = bed
        .http
        .delete(format!("{}{}?{API}", bed.server.url(), vm_path("podvm-x")))
        .bearer_auth(&bed.token)
        .send()
        .await;
    assert!(sent.is_err(), "{sent:?}");
    assert_eq!(bed.server.vms()[0].provisioning_state, "Creating");

    // Entra's faults are in its shape.
    bed.server.fault(
        Route::Token,
        Fault::Status {
            status: 503,
            code: "temporarily_unavailable".into(),
            retry_after: Some(1),
            shape: ErrorShape::Arm,
        },
        1,
    );
    let (status, body) = token_request(
        &bed.server,
        &bed.http,
        &[
            ("client_id", TEST_CLIENT_ID),
            ("client_secret", TEST_CLIENT_SECRET),
            ("grant_type", "client_credentials"),
            ("scope", SCOPE),
        ],
    )
    .await;
    assert_eq!(status, 503);
    assert_eq!(body["error"], "temporarily_unavailable");
    assert_eq!(bed.server.count(Route::PutVm), 4);
    assert_eq!(bed.server.count(Route::DeleteVm), 1);
    bed.server.reset_counts();
    assert!(bed.server.counts().is_empty());
}

/// The `PowerState/…` code of a VM read with `$expand=instanceView`, after
/// checking the status is shaped as CRP's.
fn power_in(vm: &Value) -> String {
    let statuses = vm["properties"]["instanceView"]["statuses"]
        .as_array()
        .unwrap_or_else(|| panic!("no instance view in {vm}"));
    let power = statuses
        .iter()
        .find(|s| s["code"].as_str().unwrap_or("").starts_with("PowerState/"))
        .unwrap_or_else(|| panic!("no power state in {vm}"));
    let code = power["code"].as_str().unwrap().to_owned();
    let name = code.strip_prefix("PowerState/").unwrap();
    assert_eq!(power["displayStatus"], format!("VM {name}"));
    assert_eq!(power["level"], "Info");
    code
}

#[tokio::test]
async fn vms_stop_deallocate_and_start_again() {
    let bed = Bed::new().await;
    let created = bed.put("podvm-p").await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(bed.wait(&created).await["status"], "Succeeded");
    let path = vm_path("podvm-p");
    let expanded = format!("{path}?$expand=instanceView");
    let start = format!("{path}/start");

    // A plain GET has no instance view; the expanded one says running.
    let plain = bed.call(reqwest::Method::GET, &path, None).await;
    assert!(plain.body["properties"].get("instanceView").is_none());
    let read = bed.call(reqwest::Method::GET, &expanded, None).await;
    assert_eq!(power_in(&read.body), "PowerState/running");
    assert_eq!(bed.server.vms()[0].power_state.as_deref(), Some("running"));

    // Deallocated (the name and state case-insensitive): the instance view
    // says so, the NIC, its address and the public IP stay, the disk is
    // Reserved.
    bed.server.set_power_state("PODVM-P", "Deallocated");
    let read = bed.call(reqwest::Method::GET, &expanded, None).await;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(read.body["properties"]["provisioningState"], "Succeeded");
    let statuses = &read.body["properties"]["instanceView"]["statuses"];
    assert_eq!(statuses[0]["code"], "ProvisioningState/succeeded");
    assert_eq!(
        statuses[1],
        json!({"code": "PowerState/deallocated", "displayStatus": "VM deallocated", "level": "Info"})
    );
    let view = bed
        .call(reqwest::Method::GET, &format!("{path}/instanceView"), None)
        .await;
    assert_eq!(view.status, 200, "{}", view.body);
    assert_eq!(view.body, read.body["properties"]["instanceView"]);
    assert_eq!(bed.server.count(Route::GetVmInstanceView), 1);
    let vm = &bed.server.vms()[0];
    assert_eq!(vm.power_state.as_deref(), Some("deallocated"));
    assert_eq!(vm.private_ip, Ipv4Addr::new(127, 23, 0, 2));
    assert_eq!(vm.public_ip, Some(Ipv4Addr::new(127, 24, 0, 2)));
    assert_eq!(bed.server.nics(), ["podvm-p-net"]);
    let disk = bed
        .call(
            reqwest::Method::GET,
            &format!("/subscriptions/{TEST_SUBSCRIPTION_ID}/resourceGroups/podvisor-test-rg/providers/Microsoft.Compute/disks/podvm-p-disk"),
            None,
        )
        .await;
    assert_eq!(disk.body["properties"]["diskState"], "Reserved");

    // Start: 202 with both headers; Updating and starting until the
    // operation's reads are done, then Succeeded and running.
    bed.server.set_provisioning(2, Duration::ZERO);
    let started = bed.call(reqwest::Method::POST, &start, None).await;
    assert_eq!(started.status, 202, "{}", started.body);
    assert_eq!(started.body, Value::Null);
    assert_eq!(
        started.header("x-ms-ratelimit-remaining-subscription-writes"),
        Some("1199")
    );
    let monitor = started.link("location");
    assert!(monitor.contains("monitor=true"), "{monitor}");
    assert_eq!(
        monitor.split('?').next(),
        started.link("azure-asyncoperation").split('?').next(),
        "one operation"
    );
    let vm = &bed.server.vms()[0];
    assert_eq!(vm.provisioning_state, "Updating");
    assert_eq!(vm.power_state.as_deref(), Some("starting"));
    let read = bed.call(reqwest::Method::GET, &expanded, None).await;
    assert_eq!(power_in(&read.body), "PowerState/starting");
    // A second start joins the first.
    let again = bed.call(reqwest::Method::POST, &start, None).await;
    assert_eq!(again.status, 202);
    assert_eq!(
        again.link("location").split('?').next(),
        monitor.split('?').next()
    );
    // The read of the VM above and this one are the two in progress.
    let reply = bed.send(reqwest::Method::GET, &monitor, None, &[]).await;
    assert_eq!(reply.status, 202);
    assert_eq!(bed.wait(&started).await["status"], "Succeeded");
    let read = bed.call(reqwest::Method::GET, &expanded, None).await;
    assert_eq!(read.body["properties"]["provisioningState"], "Succeeded");
    assert_eq!(power_in(&read.body), "PowerState/running");
    assert_eq!(
        read.body["properties"]["instanceView"]["statuses"][0]["code"],
        "ProvisioningState/succeeded"
    );
    assert_eq!(bed.server.vms()[0].private_ip, Ipv4Addr::new(127, 23, 0, 2));

    // A start of a running VM is accepted and has already succeeded.
    let running = bed.call(reqwest::Method::POST, &start, None).await;
    assert_eq!(running.status, 202);
    let status = bed
        .send(
            reqwest::Method::GET,
            &running.link("azure-asyncoperation"),
            None,
            &[],
        )
        .await;
    assert_eq!(status.body["status"], "Succeeded", "{}", status.body);
    assert_eq!(bed.server.count(Route::StartVm), 3);

    // A stopped VM is shown so; a delete overtakes its start.
    bed.server.set_power_state("podvm-p", "stopped");
    let read = bed.call(reqwest::Method::GET, &expanded, None).await;
    assert_eq!(power_in(&read.body), "PowerState/stopped");
    let stopped_start = bed.call(reqwest::Method::POST, &start, None).await;
    assert_eq!(stopped_start.status, 202);
    bed.server.set_deleting(5, Duration::ZERO);
    let deleted = bed.call(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(deleted.status, 202);
    let overtaken = bed.wait(&stopped_start).await;
    assert_eq!(overtaken["status"], "Failed");
    assert_eq!(overtaken["error"]["code"], "OperationPreempted");
    let read = bed.call(reqwest::Method::GET, &expanded, None).await;
    assert_eq!(power_in(&read.body), "PowerState/stopping");

    // A start of a VM being deleted is refused; of a missing one 404.
    let refused = bed.call(reqwest::Method::POST, &start, None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "OperationNotAllowed");
    let missing = bed
        .call(
            reqwest::Method::POST,
            &format!("{}/start", vm_path("nothing")),
            None,
        )
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(
        missing.body["error"],
        json!({
            "code": "ResourceNotFound",
            "message": "The Resource 'Microsoft.Compute/virtualMachines/nothing' under resource group 'podvisor-test-rg' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix",
        })
    );
    let missing = bed
        .call(
            reqwest::Method::GET,
            &format!("{}/instanceView", vm_path("nothing")),
            None,
        )
        .await;
    assert_eq!(missing.status, 404);

    // The api-version and the token are checked; the route can be faulted.
    let reply = bed.send(reqwest::Method::POST, &start, None, &[]).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["error"]["code"], "MissingApiVersionParameter");
    let reply = bed
        .http
        .post(format!("{}{start}?{API}", bed.server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status().as_u16(), 401);
    bed.server.fault(
        Route::StartVm,
        Fault::Status {
            status: 429,
            code: "TooManyRequests".into(),
            retry_after: Some(3),
            shape: ErrorShape::Arm,
        },
        1,
    );
    let reply = bed.call(reqwest::Method::POST, &start, None).await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("retry-after"), Some("3"));
}

#[test]
#[should_panic(expected = "no VM named")]
fn set_power_state_of_an_unknown_vm_panics() {
    AzureServer::start(ServerOptions::default()).set_power_state("nothing", "stopped");
}
