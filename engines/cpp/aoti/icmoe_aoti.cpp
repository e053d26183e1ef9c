// icmoe_aoti: run a model's AOTInductor package (.pt2) on the CPU with libtorch, one image -> mask.
//
//   icmoe_aoti MODEL.pt2 IMAGE.ppm MASK.pgm [--logits LOGITS.f32] [--repeat N]
//
// MODEL.pt2 comes from `python -m export.aoti` (torch._inductor.aoti_compile_and_package of the model
// family's graph, image (1, 3, S, S) float32 RGB 0..255 -> the family's outputs). The package's
// metadata names what the program needs: icmoe.image_size (S) and icmoe.output_names (the outputs in
// order, comma-separated; packages without it are older IC-MoE ones: logits,mask,expert), and what the
// mask holds: icmoe.mask_kind "binary" (0/1) or "labels" (label values, named by icmoe.class_names,
// comma-separated, index = value, 0 = background; packages without icmoe.mask_kind are older binary ones).
// IMAGE is a binary PPM/PGM of the model's size; the output named "mask" is written as a binary PGM
// (binary: 0/255; labels: the raw label values, so a downstream tool reads the label map, with the pixels
// per label printed as "label1 812 liver"), --logits writes the output named "logits" as raw float32 (all
// its values, e.g. (1, C, S, S)), every other small output is printed ("expert 2"), and so is the list of
// outputs with their types and shapes (common/outputs.h). --repeat N times N more runs and prints the mean
// latency.
// Errors: one line "error: ..." on stderr and exit code 1; usage: exit code 2.
// ATen and the package loader only (not torch/torch.h): a fraction of the compile time.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <string>
#include <unordered_map>
#include <vector>

#include "image_io.h"
#include "outputs.h"

namespace {

using Metadata = std::unordered_map<std::string, std::string>;

int usage() {
  std::cerr << "usage: icmoe_aoti MODEL.pt2 IMAGE.ppm MASK.pgm [--logits LOGITS.f32] [--repeat N]\n";
  return 2;
}

// NumPy's name of a tensor element type (the names of the package's tensor specs).
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::ScalarType::Float: return "float32";
    case at::ScalarType::Double: return "float64";
    case at::ScalarType::Half: return "float16";
    case at::ScalarType::BFloat16: return "bfloat16";
    case at::ScalarType::Long: return "int64";
    case at::ScalarType::Int: return "int32";
    case at::ScalarType::Short: return "int16";
    case at::ScalarType::Char: return "int8";
    case at::ScalarType::Byte: return "uint8";
    case at::ScalarType::Bool: return "bool";
    default: return c10::toString(t);  // icmoe::element_size refuses it
  }
}

int image_size(const Metadata& metadata, const std::string& model_path) {
  const auto found = metadata.find("icmoe.image_size");
  if (found == metadata.end())
    throw std::runtime_error(model_path + ": not a package of python -m export.aoti (no icmoe.image_size metadata)");
  size_t used = 0;
  int size = 0;
  try {
    size = std::stoi(found->second, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != found->second.size() || size <= 0)
    throw std::runtime_error(model_path + ": bad icmoe.image_size metadata '" + found->second + "'");
  return size;
}

std::vector<std::string> output_names(const Metadata& metadata, const std::string& model_path) {
  const auto found = metadata.find("icmoe.output_names");
  if (found != metadata.end()) {
    try {
      return icmoe::split_names(found->second);
    } catch (const std::exception& e) {
      throw std::runtime_error(model_path + ": bad icmoe.output_names metadata: " + e.what());
    }
  }
  std::cerr << "icmoe_aoti: " << model_path << " has no icmoe.output_names metadata (an older package); "
            << "assuming the outputs " << icmoe::kLegacyOutputNames << "\n";
  return icmoe::split_names(icmoe::kLegacyOutputNames);
}

// icmoe.mask_kind and icmoe.class_names; packages written before label models are binary.
icmoe::MaskKind mask_kind(const Metadata& metadata, const std::string& model_path) {
  const auto kind = metadata.find("icmoe.mask_kind");
  if (kind == metadata.end()) return icmoe::MaskKind{};
  const auto names = metadata.find("icmoe.class_names");
  try {
    return icmoe::make_mask_kind(kind->second, names == metadata.end() ? "" : names->second);
  } catch (const std::exception& e) {
    throw std::runtime_error(model_path + ": bad icmoe.mask_kind / icmoe.class_names metadata: " + e.what());
  }
}

// The package's outputs as host views; `host` keeps the contiguous CPU copies alive.
std::vector<icmoe::Output> host_outputs(const std::vector<at::Tensor>& results, const std::vector<std::string>& names,
                                        std::vector<at::Tensor>& host) {
  std::vector<icmoe::Output> outputs;
  for (size_t i = 0; i < results.size(); ++i) {
    host.push_back(results[i].to(at::kCPU).contiguous());
    const at::Tensor& t = host.back();
    icmoe::Output o{names[i], dtype_name(t.scalar_type()), t.sizes().vec(), t.data_ptr()};
    try {
      icmoe::element_size(o.dtype);  // refuses element types the programs do not handle
    } catch (const std::exception& e) {
      throw std::runtime_error("output " + o.name + ": " + e.what());
    }
    outputs.push_back(std::move(o));
  }
  return outputs;
}

int run(int argc, char** argv) {
  std::vector<std::string> positional;
  std::string logits_path;
  int repeat = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--logits" && i + 1 < argc) {
      logits_path = argv[++i];
    } else if (arg == "--repeat" && i + 1 < argc) {
      repeat = std::atoi(argv[++i]);
    } else if (arg == "-h" || arg == "--help") {
      return usage();
    } else if (!arg.empty() && arg[0] == '-') {
      throw std::runtime_error("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 3) return usage();
  const std::string& model_path = positional[0];
  const std::string& image_path = positional[1];
  const std::string& mask_path = positional[2];

  const icmoe::Image image = icmoe::read_pnm(image_path);  // (3, H, W) float32 0..255

  c10::InferenceMode inference_mode;
  torch::inductor::AOTIModelPackageLoader loader(model_path);
  const Metadata metadata = loader.get_metadata();
  const int size = image_size(metadata, model_path);
  if (image.width != size || image.height != size)
    throw std::runtime_error(image_path + ": image is " + std::to_string(image.width) + "x" +
                             std::to_string(image.height) + ", this model takes " + std::to_string(size) + "x" +
                             std::to_string(size));
  const std::vector<std::string> names = output_names(metadata, model_path);
  const icmoe::MaskKind kind = mask_kind(metadata, model_path);

  // (1, 3, S, S) float32 RGB 0..255: the model normalises inside, like every engine of the project.
  at::Tensor input = at::from_blob(const_cast<float*>(image.chw.data()), {1, 3, size, size}, at::kFloat).clone();
  const std::vector<at::Tensor> results = loader.run({input});
  if (results.size() != names.size())
    throw std::runtime_error(model_path + ": the package returned " + std::to_string(results.size()) +
                             " outputs, its metadata names " + std::to_string(names.size()) + " (" +
                             icmoe::join(names, ", ") + ")");

  std::vector<at::Tensor> host;  // keeps the contiguous CPU copies alive while `outputs` points into them
  const std::vector<icmoe::Output> outputs = host_outputs(results, names, host);
  icmoe::write_outputs(std::cout, outputs, size, size, mask_path, logits_path, kind);

  if (repeat > 0) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < repeat; ++i) loader.run({input});
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::cout << "latency " << ms / repeat << " ms (mean of " << repeat << ")\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const c10::Error& e) {
    std::cerr << "error: " << icmoe::first_line(e.what_without_backtrace()) << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << icmoe::first_line(e.what()) << "\n";
  }
  return 1;
}
