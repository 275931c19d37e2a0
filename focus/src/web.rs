//! The web app on the HTTP listener (`[web]` in the configuration): the built files under
//! `web.root` at `/`, and `/config.json`, which tells the app its homeserver and the focus to
//! call.
//!
//! Files are served by a fallback route, so every route of the listener (`/healthz`,
//! `/metrics`, direct mode, the appservice) keeps precedence. A request path is decoded and
//! checked segment by segment (no `..`, `.`, empty, hidden, backslash or NUL segments), then
//! the file it names is canonicalised and must still lie under the canonical root, so neither
//! `..` in any spelling nor a symlink leads outside the app.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;

/// The largest file served: the app's WebAssembly is about 8 MB, and each request reads its
/// file whole.
const MAX_FILE_BYTES: u64 = 64 << 20;
/// Cache lifetime of everything but HTML and `/config.json`.
const CACHE_ASSETS: &str = "public, max-age=3600";
/// HTML and `/config.json` are revalidated on every load, so a new build or configuration is
/// picked up at once.
const CACHE_ALWAYS_REVALIDATE: &str = "no-cache";

/// `/config.json`: where the app signs in, and which focus it calls.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AppConfig {
    pub homeserver_url: String,
    pub focus: FocusIdentity,
}

/// The focus as participants address it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FocusIdentity {
    pub user_id: String,
    pub device_id: String,
    pub session_id: String,
}

struct Site {
    /// Canonical: every served file's canonical path starts with it.
    root: PathBuf,
    config_json: Bytes,
}

/// The app's routes, to merge into the HTTP listener's router. `Err` if `root` cannot be
/// resolved.
pub fn routes(root: &Path, config: &AppConfig) -> std::io::Result<Router> {
    let root = std::fs::canonicalize(root)?;
    if !root.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    let config_json = serde_json::to_vec(config)
        .map_err(std::io::Error::other)?
        .into();
    let site = Arc::new(Site { root, config_json });
    Ok(Router::new()
        .route("/config.json", get(serve_config))
        .fallback(serve_file)
        .with_state(site))
}

async fn serve_config(State(site): State<Arc<Site>>) -> Response {
    let mut r = Body::from(site.config_json.clone()).into_response();
    set_headers(&mut r, "application/json", CACHE_ALWAYS_REVALIDATE);
    r
}

async fn serve_file(State(site): State<Arc<Site>>, method: Method, uri: Uri) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
            "method not allowed\n",
        )
            .into_response();
    }
    let relative = match request_path(uri.path()) {
        Ok(p) => p,
        Err(Refused::Malformed) => {
            return (StatusCode::BAD_REQUEST, "bad request path\n").into_response()
        }
        Err(Refused::Traversal) => {
            tracing::warn!(path = %uri.path(), "web: refused a path that tries to leave the app");
            return not_found();
        }
        Err(Refused::Hidden) => return not_found(),
    };
    let Some((file, len)) = resolve(&site.root, &relative, uri.path()).await else {
        return not_found();
    };
    if len > MAX_FILE_BYTES {
        tracing::error!(file = %file.display(), bytes = len, "web: file too large to serve");
        return (StatusCode::INTERNAL_SERVER_ERROR, "file too large\n").into_response();
    }
    let mut r = if method == Method::HEAD {
        let mut r = Body::empty().into_response();
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        r
    } else {
        match tokio::fs::read(&file).await {
            Ok(bytes) => Body::from(bytes).into_response(),
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "web: reading failed");
                return not_found();
            }
        }
    };
    tracing::debug!(file = %file.display(), bytes = len, %method, "web: served");
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let cache = if ext == "html" {
        CACHE_ALWAYS_REVALIDATE
    } else {
        CACHE_ASSETS
    };
    set_headers(&mut r, content_type(&ext), cache);
    r
}

/// The canonical file a checked relative path names (a directory's `index.html`) and its
/// length, if it exists under `root`.
async fn resolve(root: &Path, relative: &Path, shown: &str) -> Option<(PathBuf, u64)> {
    let mut file = inside(root, &root.join(relative), shown).await?;
    let mut meta = tokio::fs::metadata(&file).await.ok()?;
    if meta.is_dir() {
        file = inside(root, &file.join("index.html"), shown).await?;
        meta = tokio::fs::metadata(&file).await.ok()?;
    }
    meta.is_file().then_some((file, meta.len()))
}

/// `path` canonicalised, if it exists and lies under `root` outside any hidden directory
/// (a symlink may point elsewhere in the app, never out of it).
async fn inside(root: &Path, path: &Path, shown: &str) -> Option<PathBuf> {
    let canonical = tokio::fs::canonicalize(path).await.ok()?;
    let Ok(rest) = canonical.strip_prefix(root) else {
        tracing::warn!(
            path = shown,
            "web: refused a symlink that leads out of the app"
        );
        return None;
    };
    let hidden = rest.components().any(|c| match c {
        Component::Normal(name) => name.as_encoded_bytes().starts_with(b"."),
        _ => true,
    });
    (!hidden).then_some(canonical)
}

#[derive(Debug, PartialEq)]
enum Refused {
    /// Not percent-decodable to UTF-8.
    Malformed,
    /// `..`, `.`, an empty segment, a backslash, a NUL or an encoded `/`.
    Traversal,
    /// A segment starting with `.`: `.env`, `.git`.
    Hidden,
}

/// The relative file path a request path names (empty for `/`), its segments decoded and
/// checked. A trailing `/` is allowed (a directory); any other empty segment is not.
fn request_path(path: &str) -> Result<PathBuf, Refused> {
    let path = path.strip_prefix('/').ok_or(Refused::Malformed)?;
    let path = path.strip_suffix('/').unwrap_or(path);
    let mut relative = PathBuf::new();
    if path.is_empty() {
        return Ok(relative);
    }
    for raw in path.split('/') {
        let segment = percent_decode(raw).ok_or(Refused::Malformed)?;
        if segment.is_empty()
            || segment == "."
            || segment == ".."
            || segment.contains(['/', '\\', '\0'])
        {
            return Err(Refused::Traversal);
        }
        if segment.starts_with('.') {
            return Err(Refused::Hidden);
        }
        relative.push(segment);
    }
    Ok(relative)
}

/// `%XX` decoded; `None` if an escape is incomplete or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The content type of a file by its (lower-case) extension.
fn content_type(ext: &str) -> &'static str {
    match ext {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        // WebAssembly.instantiateStreaming refuses any other type.
        "wasm" => "application/wasm",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "ico" => "image/x-icon",
        "txt" => "text/plain; charset=utf-8",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

fn set_headers(r: &mut Response, content_type: &'static str, cache: &'static str) {
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{router, HttpState};
    use crate::metrics::Metrics;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A temporary app: `index.html`, `pkg/app.wasm`, `pkg/app.js`, `sub/index.html`, a
    /// hidden `.env`, and a symlink to a secret beside (not under) the root.
    struct App {
        dir: PathBuf,
        root: PathBuf,
    }

    impl App {
        fn new(name: &str) -> App {
            let dir = std::env::temp_dir().join(format!(
                "weir-web-{name}-{}-{:?}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            let root = dir.join("app");
            std::fs::create_dir_all(root.join("pkg")).unwrap();
            std::fs::create_dir_all(root.join("sub")).unwrap();
            std::fs::write(root.join("index.html"), "<h1>weir</h1>").unwrap();
            std::fs::write(root.join("pkg/app.wasm"), b"\0asm\x01\0\0\0").unwrap();
            std::fs::write(root.join("pkg/app.js"), "export {};").unwrap();
            std::fs::write(root.join("sub/index.html"), "<h1>sub</h1>").unwrap();
            std::fs::write(root.join(".env"), "SECRET=hidden").unwrap();
            std::fs::write(dir.join("x"), "SECRET=outside").unwrap();
            std::os::unix::fs::symlink(dir.join("x"), root.join("escape")).unwrap();
            std::os::unix::fs::symlink(root.join("pkg/app.js"), root.join("alias.js")).unwrap();
            App { dir, root }
        }
    }

    impl Drop for App {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn app_config() -> AppConfig {
        AppConfig {
            homeserver_url: "https://matrix.example.org".into(),
            focus: FocusIdentity {
                user_id: "@focus:example.org".into(),
                device_id: "WEIRFOCUS".into(),
                session_id: "sfu".into(),
            },
        }
    }

    /// The listener's router with the app merged in, served on 127.0.0.1.
    async fn serve(app: &App) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let state = HttpState {
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(|| Ok(())),
        };
        let web = routes(&app.root, &app_config()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router(state, Some(web))).await;
        });
        (addr, task)
    }

    struct Answer {
        status: u16,
        headers: String,
        body: Vec<u8>,
    }

    impl Answer {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim())
            })
        }
    }

    /// One raw HTTP/1.1 request, the target sent exactly as given.
    async fn request(addr: std::net::SocketAddr, method: &str, target: &str) -> Answer {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req =
            format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let headers = String::from_utf8(raw[..split].to_vec()).unwrap();
        let status = headers.split_whitespace().nth(1).unwrap().parse().unwrap();
        Answer {
            status,
            headers,
            body: raw[split + 4..].to_vec(),
        }
    }

    async fn get(addr: std::net::SocketAddr, target: &str) -> Answer {
        request(addr, "GET", target).await
    }

    #[tokio::test]
    async fn web_serves_the_index_and_files_with_their_types() {
        let app = App::new("files");
        let (addr, task) = serve(&app).await;
        let a = get(addr, "/").await;
        assert_eq!(a.status, 200, "{}", a.headers);
        assert_eq!(a.body, b"<h1>weir</h1>");
        assert_eq!(a.header("content-type"), Some("text/html; charset=utf-8"));
        assert_eq!(a.header("cache-control"), Some("no-cache"));
        assert_eq!(a.header("x-content-type-options"), Some("nosniff"));

        let a = get(addr, "/pkg/app.wasm").await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, b"\0asm\x01\0\0\0");
        assert_eq!(a.header("content-type"), Some("application/wasm"));
        assert_eq!(a.header("cache-control"), Some("public, max-age=3600"));
        assert_eq!(a.header("x-content-type-options"), Some("nosniff"));

        let a = get(addr, "/pkg/app.js?v=1").await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, b"export {};");
        assert_eq!(
            a.header("content-type"),
            Some("text/javascript; charset=utf-8")
        );
        // Percent-encoded names, and a symlink that stays inside the app.
        assert_eq!(get(addr, "/pkg/app%2Ejs").await.body, b"export {};");
        assert_eq!(get(addr, "/alias.js").await.body, b"export {};");

        let a = request(addr, "HEAD", "/pkg/app.wasm").await;
        assert_eq!(a.status, 200);
        assert_eq!(a.header("content-length"), Some("8"));
        assert!(a.body.is_empty());
        let a = request(addr, "POST", "/pkg/app.wasm").await;
        assert_eq!(a.status, 405);

        let a = get(addr, "/nothing-here.js").await;
        assert_eq!(a.status, 404);
        assert_eq!(a.body, b"not found\n");
        task.abort();
    }

    #[tokio::test]
    async fn web_serves_a_directory_as_its_index() {
        let app = App::new("dir");
        let (addr, task) = serve(&app).await;
        for target in ["/sub", "/sub/"] {
            let a = get(addr, target).await;
            assert_eq!(a.status, 200, "{target}");
            assert_eq!(a.body, b"<h1>sub</h1>", "{target}");
            assert_eq!(a.header("content-type"), Some("text/html; charset=utf-8"));
        }
        // A directory without an index is not listed.
        assert_eq!(get(addr, "/pkg/").await.status, 404);
        task.abort();
    }

    #[tokio::test]
    async fn web_refuses_paths_out_of_the_app_and_hidden_files() {
        let app = App::new("refuse");
        // The symlink works: only the check keeps it from being served.
        let through = std::fs::read_to_string(app.root.join("escape")).unwrap();
        assert_eq!(through, "SECRET=outside");
        let (addr, task) = serve(&app).await;
        for target in [
            "/../etc/passwd",
            "/../x",
            "/%2e%2e/x",
            "/%2E%2E/x",
            "/a/%2e%2e/%2e%2e/x",
            "/sub/../../x",
            "/sub/%2e%2e%2f%2e%2e%2fx",
            "/..%5cx",
            "/.%2e/x",
            "/./index.html",
            "//etc/passwd",
            "/sub//index.html",
            "/index.html%00",
            "/escape",
            "/.env",
            "/%2eenv",
            "/sub/.env",
            "/%zz",
            "/%ff",
        ] {
            let a = get(addr, target).await;
            assert!(
                a.status == 404 || a.status == 400,
                "{target}: {}",
                a.headers
            );
            let body = String::from_utf8_lossy(&a.body);
            assert!(!body.contains("SECRET"), "{target}: {body}");
            assert!(!body.contains("root:"), "{target}: {body}");
        }
        task.abort();
    }

    #[tokio::test]
    async fn web_config_json_names_the_homeserver_and_the_focus() {
        let app = App::new("config");
        let (addr, task) = serve(&app).await;
        let a = get(addr, "/config.json").await;
        assert_eq!(a.status, 200);
        assert_eq!(a.header("content-type"), Some("application/json"));
        assert_eq!(a.header("cache-control"), Some("no-cache"));
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "homeserver_url": "https://matrix.example.org",
                "focus": {"user_id": "@focus:example.org", "device_id": "WEIRFOCUS", "session_id": "sfu"}
            })
        );
        task.abort();
    }

    #[tokio::test]
    async fn web_routes_leave_the_listeners_own_routes_first() {
        let app = App::new("healthz");
        // Files named like the listener's routes do not shadow them.
        std::fs::write(app.root.join("healthz"), "file").unwrap();
        std::fs::write(app.root.join("metrics"), "file").unwrap();
        let (addr, task) = serve(&app).await;
        let a = get(addr, "/healthz").await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, b"ok\n");
        let a = get(addr, "/metrics").await;
        assert_eq!(a.status, 200);
        assert_ne!(a.body, b"file");
        task.abort();
    }

    #[test]
    fn web_request_paths_are_decoded_and_checked() {
        assert_eq!(request_path("/"), Ok(PathBuf::new()));
        assert_eq!(request_path("/a/b%20c.js"), Ok(PathBuf::from("a/b c.js")));
        assert_eq!(request_path("/a/"), Ok(PathBuf::from("a")));
        assert_eq!(request_path("/a/%2e%2e"), Err(Refused::Traversal));
        assert_eq!(request_path("/a%2fb"), Err(Refused::Traversal));
        assert_eq!(request_path("/a//b"), Err(Refused::Traversal));
        assert_eq!(request_path("/.git/config"), Err(Refused::Hidden));
        assert_eq!(request_path("/a%2"), Err(Refused::Malformed));
        assert_eq!(request_path("/%c3%28"), Err(Refused::Malformed));
        assert_eq!(content_type("wasm"), "application/wasm");
        assert_eq!(content_type("exe"), "application/octet-stream");
    }
}
