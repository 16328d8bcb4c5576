fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[
                "proto/metaraft/v1/kv.proto",
                "proto/metaraft/v1/backup.proto",
                "proto/metaraft/v1/meta.proto",
                "proto/metaraft/v1/peer.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
