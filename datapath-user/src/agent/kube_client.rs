//! The Kubernetes client the agent watches with: credentials from
//! --kubeconfig or the usual places, optionally pointed at the API
//! server's real address (no kube-proxy to reach the `kubernetes`
//! ClusterIP before the agent programs it).

use std::path::PathBuf;

use anyhow::{Context, Result};

pub(super) async fn kube_client(
    kubeconfig: Option<&PathBuf>,
    api_server: Option<&str>,
) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading --kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("using --kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "finding the API server (in-cluster service account, KUBECONFIG or ~/.kube/config); \
             use --from-dir to run without one",
        )?,
    };
    let config = match api_server {
        Some(address) => with_api_server(config, address)?,
        None => config,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// `config` (its credentials and CA) pointed at `address` instead of the
/// server it names: `https://HOST:PORT`, or `HOST:PORT` (https implied).
pub fn with_api_server(mut config: kube::Config, address: &str) -> Result<kube::Config> {
    let url = if address.contains("://") {
        address.to_owned()
    } else {
        format!("https://{address}")
    };
    config.cluster_url = url
        .parse()
        .with_context(|| format!("--api-server {address:?} is not a URL (https://HOST:PORT)"))?;
    if config.cluster_url.host().is_none() {
        anyhow::bail!("--api-server {address:?} names no host (https://HOST:PORT)");
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_server_address_replaces_the_credentials_one_and_keeps_the_rest() {
        let mut base = kube::Config::new("https://10.96.0.1:443".parse().unwrap());
        base.default_namespace = "kube-system".into();
        let config = with_api_server(base.clone(), "192.0.2.10:6443").unwrap();
        assert_eq!(config.cluster_url.to_string(), "https://192.0.2.10:6443/");
        assert_eq!(config.default_namespace, "kube-system");
        let config = with_api_server(base.clone(), "https://api.example:6443").unwrap();
        assert_eq!(config.cluster_url.host(), Some("api.example"));
        let error = with_api_server(base, "https://").unwrap_err().to_string();
        assert!(error.contains("--api-server"), "{error}");
    }
}
