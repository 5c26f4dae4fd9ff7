//! A `countersign run --workers 2` whose `proxy.toml` the test rewrites and reloads (SIGHUP),
//! and a raw HTTP/1.1 exchange on a socket: shared by the reload tests of the listeners'
//! limits and timeouts. Include after `mod support; mod support_run;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::*;
use crate::support_run::*;

/// `proxy.toml`: [`config_text`] with an admin listener, `server` in place of its
/// `shutdown_grace` line, `admin` after `[admin]`'s `listen` and `upstream` appended to its
/// `[[upstream]]`.
pub fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream_url: &str,
    server: &str,
    admin_extra: &str,
    upstream: &str,
) -> String {
    let admin_line = format!("listen = \"{admin}\"\n");
    config_text(&listen.to_string(), Some(&admin.to_string()), upstream_url)
        .replace("shutdown_grace = \"2s\"\n", &format!("{server}\n"))
        .replace(&admin_line, &format!("{admin_line}{admin_extra}\n"))
        + upstream
        + "\n"
}

pub struct Running {
    pub proxy: RunningProxy,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: TestDir,
    pub upstream_url: String,
    pub upstream: String,
}

impl Running {
    /// The config with these `[server]` and `[admin]` lines (the upstream as started).
    pub fn text(&self, server: &str, admin: &str) -> String {
        config(
            self.addr,
            self.admin,
            &self.upstream_url,
            server,
            admin,
            &self.upstream,
        )
    }

    /// Writes `text` as `proxy.toml` (atomically) and sends SIGHUP; returns once the proxy
    /// has logged one more line about the file (applied, waiting or invalid).
    pub fn reload_text(&self, text: &str) {
        self.write_file(text);
        let lines = self.file_lines();
        self.proxy.signal("HUP");
        self.wait_for_new_file_lines(&lines);
    }

    pub fn write_file(&self, text: &str) {
        let staged = self.dir.join(".proxy.toml.new");
        write(&staged, text);
        std::fs::rename(&staged, self.dir.join("proxy.toml")).unwrap();
    }

    pub fn wait_for_new_file_lines(&self, lines: &FileLines) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while &self.file_lines() == lines {
            assert!(
                Instant::now() < deadline,
                "no line about the file: {}",
                self.proxy.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Every line of one reload is written together; a little slack for the last.
        std::thread::sleep(Duration::from_millis(200));
    }

    /// The lines reloads logged about proxy.toml so far.
    pub fn file_lines(&self) -> FileLines {
        FileLines {
            applied: self.proxy.json_messages("INFO", &["proxy.toml: applied"]),
            waiting: self
                .proxy
                .json_messages("WARN", &["proxy.toml changed since"]),
            invalid: self.proxy.json_messages("ERROR", &["would not start"]),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct FileLines {
    pub applied: Vec<String>,
    pub waiting: Vec<String>,
    pub invalid: Vec<String>,
}

/// `countersign run --workers 2` with these `[server]` lines, `[admin]` extras and
/// `[[upstream]]` extras, its upstream at `upstream_url`.
pub fn start_reloadable(
    tag: &str,
    server: &str,
    admin: &str,
    upstream_url: &str,
    upstream: &str,
) -> Running {
    let dir = temp_dir(tag);
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let (mut proxy, addr, admin_addr) = start_on_free_ports(|addr, admin_addr| {
        let file = dir.join("proxy.toml");
        write(
            &file,
            &config(addr, admin_addr, upstream_url, server, admin, upstream),
        );
        RunningProxy::spawn(&file, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    Running {
        proxy,
        addr,
        admin: admin_addr,
        dir,
        upstream_url: upstream_url.to_owned(),
        upstream: upstream.to_owned(),
    }
}

impl Running {
    /// Rewrites `proxy.toml` with `server` (its `[server]` lines) and `admin` (its `[admin]`
    /// extras), sends SIGHUP, and returns the info line naming `key` as applied.
    pub fn reload(&self, server: &str, admin: &str, key: &str) -> String {
        let staged = self.dir.join(".proxy.toml.new");
        write(&staged, &self.text(server, admin));
        std::fs::rename(&staged, self.dir.join("proxy.toml")).unwrap();
        let said = ["SIGHUP:", "proxy.toml: applied", key];
        let before = self.proxy.json_messages("INFO", &said).len();
        self.proxy.signal("HUP");
        let applied = self.proxy.wait_json_messages("INFO", &said, before + 1);
        assert!(
            self.proxy.json_messages("WARN", &["restart"]).is_empty(),
            "{}",
            self.proxy.log()
        );
        applied[before].clone()
    }
}

/// Sends `request` on `stream` and reads one whole answer (head, and the body its
/// `content-length` announces) or until the proxy closes: its status line ("" when closed
/// without an answer).
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, request: &[u8]) -> String {
    if stream.write_all(request).await.is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if bytes.len() >= end + 4 + length {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no answer (nor a close) within 10 s");
    String::from_utf8_lossy(&bytes)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// A keep-alive connection to `addr` answered `expect` to `request`, retried for up to 10 s
/// (a slot is free again only once the server has ended the connection that held it, a
/// moment after the client saw it close). Panics if none is.
pub async fn hold(addr: SocketAddr, request: &[u8], expect: &str) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let status = exchange(&mut stream, request).await;
        if status.starts_with(expect) {
            return stream;
        }
        assert!(status.is_empty(), "{status:?}");
        assert!(
            Instant::now() < deadline,
            "no slot for a connection to {addr} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
