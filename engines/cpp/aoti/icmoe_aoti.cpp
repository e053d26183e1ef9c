// icmoe_aoti: run a model's AOTInductor package (.pt2) on the CPU with libtorch, one image -> mask.
//
//   icmoe_aoti MODEL.pt2 IMAGE MASK [--logits LOGITS.f32] [--repeat N]
//
// MODEL.pt2 comes from `python -m export.aoti` (torch._inductor.aoti_compile_and_package of the model
// family's graph, image (1, 3, S, S) float32 RGB 0..255 -> the family's outputs). The package's
// metadata names what the program needs: icmoe.image_size (S) and icmoe.output_names (the outputs in
// order, comma-separated; packages without it are older IC-MoE ones: logits,mask,expert), and what the
// mask holds: icmoe.mask_kind "binary" (0/1) or "labels" (label values, named by icmoe.class_names,
// comma-separated, index = value, 0 = background; packages without icmoe.mask_kind are older binary ones),
// and icmoe.mask_rule, how the mask follows from the logits ("threshold", "argmax"; absent: none).
// IMAGE is a PNG, JPEG, BMP or PPM/PGM of any size (common/image_io.h), resized to S x S as the Python
// loaders do (Pillow's bilinear filter, common/resize.h). The mask at the image's size is made from the
// output named "logits" resized bilinearly and thresholded or arg-maxed by the rule (or, without a rule or
// with --upsample nearest, the output named "mask" resized by nearest neighbour), and written as PNG, or
// PGM for a MASK ending in .pgm (binary: 0/255; labels: the
// raw label values, so a downstream tool reads the label map, with the pixels per label printed as
// "label1 812 liver"); --logits writes the output named "logits" as raw float32 at the model's size (all
// its values, e.g. (1, C, S, S)), every other small output is printed ("expert 2"), and so is the list of
// outputs with their types and shapes (common/outputs.h). --repeat N times N more runs and prints the mean
// latency.
// Errors: one line "error: ..." on stderr and exit code 1; command-line mistakes exit with 2; --help
// prints the usage to stdout.
// ATen and the package loader only (not torch/torch.h): a fraction of the compile time.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <chrono>
#include <iostream>
#include <string>
#include <unordered_map>
#include <vector>

#include "args.h"
#include "image_io.h"
#include "outputs.h"

namespace {

using Metadata = std::unordered_map<std::string, std::string>;

icmoe::ArgParser make_parser() {
  icmoe::ArgParser parser("icmoe_aoti", {"MODEL.pt2", "IMAGE", "MASK"},
                          "Runs an AOTInductor package of python -m export.aoti on one image (PNG, JPEG, BMP, PPM/PGM;\n"
                          "any size: resized to the model's) and writes the mask at the image's size (MASK: .png or\n"
                          ".pgm; binary masks 0/255, label maps their label values).");
  icmoe::add_run_options(parser);
  return parser;
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

// icmoe.mask_kind, icmoe.class_names and icmoe.mask_rule; packages written before label models are binary,
// those written before mask rules have none (their mask is resized by nearest neighbour).
icmoe::MaskKind mask_kind(const Metadata& metadata, const std::string& model_path) {
  const auto kind = metadata.find("icmoe.mask_kind");
  if (kind == metadata.end()) return icmoe::MaskKind{};
  const auto names = metadata.find("icmoe.class_names");
  const auto rule = metadata.find("icmoe.mask_rule");
  try {
    return icmoe::make_mask_kind(kind->second, names == metadata.end() ? "" : names->second,
                                 rule == metadata.end() ? "" : rule->second);
  } catch (const std::exception& e) {
    throw std::runtime_error(model_path + ": bad icmoe.mask_kind / icmoe.class_names / icmoe.mask_rule metadata: " +
                             e.what());
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

int run(const icmoe::RunArguments& args) {
  const icmoe::Rgb8 image = icmoe::load_image(args.image, args.limits);

  c10::InferenceMode inference_mode;
  torch::inductor::AOTIModelPackageLoader loader(args.model);
  const Metadata metadata = loader.get_metadata();
  const int size = image_size(metadata, args.model);
  const icmoe::Image input_image = icmoe::model_input(image, size, size);  // (3, S, S) float32 0..255
  const std::vector<std::string> names = output_names(metadata, args.model);
  const icmoe::MaskKind kind = mask_kind(metadata, args.model);

  // (1, 3, S, S) float32 RGB 0..255: the model normalises inside, like every engine of the project.
  at::Tensor input = at::from_blob(const_cast<float*>(input_image.chw.data()), {1, 3, size, size}, at::kFloat).clone();
  const std::vector<at::Tensor> results = loader.run({input});
  if (results.size() != names.size())
    throw std::runtime_error(args.model + ": the package returned " + std::to_string(results.size()) +
                             " outputs, its metadata names " + std::to_string(names.size()) + " (" +
                             icmoe::join(names, ", ") + ")");

  std::vector<at::Tensor> host;  // keeps the contiguous CPU copies alive while `outputs` points into them
  const std::vector<icmoe::Output> outputs = host_outputs(results, names, host);
  icmoe::write_outputs(std::cout, outputs, size, size, {args.mask, image.width, image.height}, args.logits, kind,
                       args.upsample);

  if (args.repeat > 0) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < args.repeat; ++i) loader.run({input});
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::cout << "latency " << ms / args.repeat << " ms (mean of " << args.repeat << ")\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const icmoe::ArgParser parser = make_parser();
    icmoe::Arguments args;
    int exit_code = 0;
    if (!icmoe::parse_command_line(parser, argc, argv, args, exit_code)) return exit_code;
    return run(icmoe::run_arguments(args));
  } catch (const icmoe::UsageError& e) {
    std::cerr << "error: " << icmoe::first_line(e.what()) << "\n";
    return 2;
  } catch (const c10::Error& e) {
    std::cerr << "error: " << icmoe::first_line(e.what_without_backtrace()) << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << icmoe::first_line(e.what()) << "\n";
  }
  return 1;
}
