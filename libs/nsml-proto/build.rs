//! Compiles `proto/` with protox (no system `protoc` needed) and generates tonic code.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<PathBuf> = std::fs::read_dir(root.join("nsml/v1"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let mut compiler = protox::Compiler::new([&root])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(&files)?;
    let fds = compiler.file_descriptor_set();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let pool = compiler.descriptor_pool();
    std::fs::write(out.join("internal_methods.rs"), internal_methods(&pool)?)?;
    std::fs::write(out.join("type_names.rs"), type_names(&pool))?;
    std::fs::write(
        out.join("nsml_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Servers decode requests with the crate's own codec (an undecodable request is INVALID_ARGUMENT);
    // clients keep tonic's. The clients are generated apart, over the messages generated with the servers.
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .codec_path("crate::codec::RequestCodec")
        .compile_fds(fds.clone())?;
    let clients = out.join("clients");
    std::fs::create_dir_all(&clients)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .extern_path(".nsml.v1", "crate::v1")
        .out_dir(&clients)
        .compile_fds(fds)?;
    Ok(())
}

/// The gRPC paths of the methods marked `option (nsml.v1.internal) = true`, as a Rust constant.
fn internal_methods(
    pool: &prost_reflect::DescriptorPool,
) -> Result<String, Box<dyn std::error::Error>> {
    let internal = pool
        .get_extension_by_name("nsml.v1.internal")
        .ok_or("proto/ declares no `nsml.v1.internal` method option")?;
    let mut paths = Vec::new();
    for service in pool.services() {
        for method in service.methods() {
            let options = method.options();
            if options.has_extension(&internal)
                && options.get_extension(&internal).as_bool() == Some(true)
            {
                paths.push(format!("/{}/{}", service.full_name(), method.name()));
            }
        }
    }
    paths.sort();
    let mut code = String::from(
        "/// The methods `proto/` marks `option (nsml.v1.internal) = true`: only the platform's services\n\
         /// and runners may call them.\npub const INTERNAL_METHODS: &[&str] = &[\n",
    );
    for path in paths {
        code.push_str(&format!("    {path:?},\n"));
    }
    code.push_str("];\n");
    Ok(code)
}

/// `prost::Name` for every message of `nsml.v1`, so that a message can be found in the descriptor by its type.
fn type_names(pool: &prost_reflect::DescriptorPool) -> String {
    let mut code = String::new();
    for message in pool.all_messages() {
        if message.package_name() != "nsml.v1" || message.parent_message().is_some() {
            continue;
        }
        code.push_str(&format!(
            "impl ::prost::Name for {name} {{\n    const NAME: &'static str = {name:?};\n    const PACKAGE: &'static str = \"nsml.v1\";\n}}\n",
            name = message.name()
        ));
    }
    code
}
