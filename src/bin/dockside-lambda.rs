//! `dockside-lambda`: the registry as an AWS Lambda function (feature `lambda`), configured by
//! environment variables (`dockside::adapters::lambda::Settings::from_env`; README, "AWS
//! Lambda"). Build with `cargo lambda build --release --features lambda --bin dockside-lambda`.

use dockside::adapters::lambda::{self, Settings};

fn main() -> std::process::ExitCode {
    // CloudWatch takes stderr line by line; the level from RUST_LOG, else info.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .without_time()
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dockside-lambda: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(async {
        let settings = Settings::from_env(|k| std::env::var(k).ok())?;
        let mode = settings.mode;
        let registry = settings.open().await?;
        tracing::info!("dockside-lambda ready, {mode:?} responses");
        lambda::run(registry, mode).await.map_err(|e| e.to_string())
    });
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // An init failure: Lambda reports it and retries the cold start.
            eprintln!("dockside-lambda: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
