#include "topk_gather_plugin.h"

#include <limits>
#include <new>

#include "topk_gather_kernels.h"

using namespace nvinfer1;

namespace tokenskip {
namespace plugin {

namespace {
constexpr char const* kName = "TopKGather";
enum Io : int32_t { kHidden = 0, kScores = 1, kValid = 2, kKept = 3, kIndex = 4 };
constexpr int32_t kNbInputs = 3, kNbOutputs = 2;
} // namespace

TopKGatherPlugin::TopKGatherPlugin(Keep keep) : mKeep(keep) {}

char const* TopKGatherPlugin::getPluginName() const noexcept { return kName; }

IPluginV3* TopKGatherPlugin::clone() noexcept {
    return new (std::nothrow) TopKGatherPlugin(mKeep);
}

int32_t TopKGatherPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                             int32_t nbInputs) const noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
    outputTypes[0] = inputTypes[kHidden];
    outputTypes[1] = DataType::kINT64;  // ONNX index type (docs/ops.md)
    return 0;
}

int32_t TopKGatherPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
                                          DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& eb) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || inputs[kHidden].nbDims != 3 ||
        inputs[kScores].nbDims != 2 || inputs[kValid].nbDims != 2) {
        logError("TopKGather: expects hidden [B,S,H], scores [B,S] and valid [B,S] (an export from before the "
                 "valid input must be re-exported)");
        return -1;
    }
    // k = keep(S) = min(S, max(min_keep, ceil(keep_num * S / keep_den))): symbolic, so any S in the profile works
    IDimensionExpr const* S = inputs[kHidden].d[1];
    IDimensionExpr const* num = eb.operation(DimensionOperation::kPROD, *S, *eb.constant(mKeep.num));
    IDimensionExpr const* k = eb.operation(DimensionOperation::kCEIL_DIV, *num, *eb.constant(mKeep.den));
    k = eb.operation(DimensionOperation::kMAX, *k, *eb.constant(mKeep.minKeep));
    k = eb.operation(DimensionOperation::kMIN, *k, *S);
    outputs[0].nbDims = 3;  // kept [B,k,H]
    outputs[0].d[0] = inputs[kHidden].d[0];
    outputs[0].d[1] = k;
    outputs[0].d[2] = inputs[kHidden].d[2];
    outputs[1].nbDims = 2;  // index [B,k]
    outputs[1].d[0] = inputs[kHidden].d[0];
    outputs[1].d[1] = k;
    return 0;
}

bool TopKGatherPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                                 int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos > kIndex) return false;
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    switch (pos) {
    case kHidden: return isHiddenType(d.type);
    case kScores: return d.type == DataType::kFLOAT;
    case kValid: return d.type == DataType::kBOOL;
    case kKept: return d.type == inOut[kHidden].desc.type;
    default: return d.type == DataType::kINT64;
    }
}

int32_t TopKGatherPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                          DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
    for (int i = 0; i < 2; ++i) {  // B and S must agree wherever known
        int64_t a = in[kHidden].desc.dims.d[i], b = in[kScores].desc.dims.d[i], v = in[kValid].desc.dims.d[i];
        if ((a >= 0 && b >= 0 && a != b) || (a >= 0 && v >= 0 && a != v)) {
            logError("TopKGather: hidden, scores and valid disagree on dimension " + std::to_string(i));
            return -1;
        }
    }
    return 0;
}

size_t TopKGatherPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*,
                                          int32_t) const noexcept {
    Dims const& m = inputs[kHidden].max;  // covers every shape of the profile, either selection path
    return topk::selectWorkspaceSize(m.d[0], m.d[1]);
}

int32_t TopKGatherPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
                                  void const* const* inputs, void* const* outputs, void* workspace,
                                  cudaStream_t stream) noexcept {
    Dims const& hd = inputDesc[kHidden].dims;
    Dims const& sd = inputDesc[kScores].dims;
    Dims const& vd = inputDesc[kValid].dims;
    int64_t const B = hd.d[0], S = hd.d[1], H = hd.d[2];
    int64_t const k = keepCount(S, mKeep);
    int64_t const maxInt = std::numeric_limits<int32_t>::max();
    if (sd.d[0] != B || sd.d[1] != S || vd.d[0] != B || vd.d[1] != S || outputDesc[1].dims.d[1] != k || B > maxInt ||
        S > maxInt || H > maxInt) {
        logError("TopKGather: runtime shapes do not match (hidden [B,S,H], scores [B,S], valid [B,S], index [B,k])");
        return -1;
    }
    ElemKind ek;
    if (!toElemKind(inputDesc[kHidden].type, ek)) return -1;
    cudaError_t err = topk::launchTopKGather(ek, IndexKind::kI64, inputs[kHidden], static_cast<float const*>(inputs[kScores]),
                                             static_cast<uint8_t const*>(inputs[kValid]), int(B), int(S), int(H), mKeep,
                                             outputs[0], outputs[1], workspace, stream);
    if (err != cudaSuccess) {
        logError(std::string("TopKGather: kernel launch failed: ") + cudaGetErrorString(err));
        return -1;
    }
    return 0;
}

PluginFieldCollection const* TopKGatherPlugin::getFieldsToSerialize() noexcept {
    mFields.set({PluginField("keep_num", &mKeep.num, PluginFieldType::kINT64, 1),
                 PluginField("keep_den", &mKeep.den, PluginFieldType::kINT64, 1),
                 PluginField("min_keep", &mKeep.minKeep, PluginFieldType::kINT64, 1)});
    return mFields.get();
}

// ------------------------------------------------------------------------------------ creator
TopKGatherCreator::TopKGatherCreator() {
    mFields.set({PluginField("keep_num", nullptr, PluginFieldType::kINT64, 1),
                 PluginField("keep_den", nullptr, PluginFieldType::kINT64, 1),
                 PluginField("min_keep", nullptr, PluginFieldType::kINT64, 1)});
}

char const* TopKGatherCreator::getPluginName() const noexcept { return kName; }

IPluginV3* TopKGatherCreator::createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept {
    int64_t num = 0, den = 0, minKeep = 0;
    // all three are required: torch.export drops arguments equal to defaults, so none has one
    if (!readIntField(fc, kName, "keep_num", num) || !readIntField(fc, kName, "keep_den", den) ||
        !readIntField(fc, kName, "min_keep", minKeep))
        return nullptr;
    if (num < 0 || den < 1 || minKeep < 1 || num > std::numeric_limits<int32_t>::max() ||
        den > std::numeric_limits<int32_t>::max()) {
        logError("TopKGather: need keep_num >= 0, keep_den >= 1, min_keep >= 1 (got " + std::to_string(num) + "/" +
                 std::to_string(den) + ", min_keep " + std::to_string(minKeep) + ")");
        return nullptr;
    }
    return new (std::nothrow) TopKGatherPlugin(Keep{num, den, minKeep});
}

} // namespace plugin
} // namespace tokenskip
