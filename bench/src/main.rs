use clap::Parser;

// The agent binary's allocator and settings (`datapath_user::memory`):
// the in-process control-plane benches (`agent`, `scale`) run the agent's
// code, and allocation is a large part of a full sync.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: datapath_user::memory::JemallocConf =
    datapath_user::memory::JemallocConf(datapath_user::memory::JEMALLOC_CONF.as_ptr());

fn main() -> std::process::ExitCode {
    match bench::run(bench::Opts::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
