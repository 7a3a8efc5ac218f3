def forward(self, input_ids):
    input_ids, = fx_pytree.tree_flatten_spec(([input_ids], {}), self._in_spec)
    transformer_wpe_weight = self.transformer.wpe.weight
    transformer_h_0_ln_1_weight = getattr(self.transformer.h, "0").ln_1.weight
    transformer_h_0_ln_1_bias = getattr(self.transformer.h, "0").ln_1.bias
    transformer_h_0_attn_c_attn_weight = getattr(self.transformer.h, "0").attn.c_attn.weight
    transformer_h_0_attn_c_attn_bias = getattr(self.transformer.h, "0").attn.c_attn.bias
    transformer_h_0_attn_c_proj_weight = getattr(self.transformer.h, "0").attn.c_proj.weight
    transformer_h_0_attn_c_proj_bias = getattr(self.transformer.h, "0").attn.c_proj.bias
    transformer_h_0_ln_2_weight = getattr(self.transformer.h, "0").ln_2.weight
    transformer_h_0_ln_2_bias = getattr(self.transformer.h, "0").ln_2.bias
    transformer_h_0_mlp_c_fc_weight = getattr(self.transformer.h, "0").mlp.c_fc.weight
    transformer_h_0_mlp_c_fc_bias = getattr(self.transformer.h, "0").mlp.c_fc.bias
    transformer_h_0_mlp_c_proj_weight = getattr(self.transformer.h, "0").mlp.c_proj.weight
    transformer_h_0_mlp_c_proj_bias = getattr(self.transformer.h, "0").mlp.c_proj.bias
    transformer_h_1_ln_1_weight = getattr(self.transformer.h, "1").ln_1.weight
    transformer_h_1_ln_1_bias = getattr(self.transformer.h, "1").ln_1.bias
    transformer_h_1_attn_c_attn_weight = getattr(self.transformer.h, "1").attn.c_attn.weight
    transformer_h_1_attn_c_attn_bias = getattr(self.transformer.h, "1").attn.c_attn.bias
    transformer_h_1_attn_c_proj_weight = getattr(self.transformer.h, "1").attn.c_proj.weight
    transformer_h_1_attn_c_proj_bias = getattr(self.transformer.h, "1").attn.c_proj.bias
    transformer_h_1_ln_2_weight = getattr(self.transformer.h, "1").ln_2.weight
    transformer_h_1_ln_2_bias = getattr(self.transformer.h, "1").ln_2.bias
    transformer_h_1_mlp_c_fc_weight = getattr(self.transformer.h, "1").mlp.c_fc.weight
    transformer_h_1_mlp_c_fc_bias = getattr(self.transformer.h, "1").mlp.c_fc.bias
    transformer_h_1_mlp_c_proj_weight = getattr(self.transformer.h, "1").mlp.c_proj.weight
    transformer_h_1_mlp_c_proj_bias = getattr(self.transformer.h, "1").mlp.c_proj.bias
    transformer_ln_f_weight = self.transformer.ln_f.weight
    transformer_ln_f_bias = self.transformer.ln_f.bias
    lm_head_weight = self.lm_head.weight
    _guards_fn = self._guards_fn(input_ids);  _guards_fn = None
    sym_size_int_4 = torch.ops.aten.sym_size.int(input_ids, 0)
    sym_size_int_5 = torch.ops.aten.sym_size.int(input_ids, 1)
    arange = torch.ops.aten.arange.start(0, sym_size_int_5, dtype = torch.int64, device = device(type='cpu'), pin_memory = False)
    embedding = torch.ops.aten.embedding.default(lm_head_weight, input_ids);  input_ids = None
    embedding_1 = torch.ops.aten.embedding.default(transformer_wpe_weight, arange);  transformer_wpe_weight = arange = None
    add = torch.ops.aten.add.Tensor(embedding, embedding_1);  embedding = embedding_1 = None
    dropout = torch.ops.aten.dropout.default(add, 0.0, False);  add = None
    layer_norm = torch.ops.aten.layer_norm.default(dropout, [64], transformer_h_0_ln_1_weight, transformer_h_0_ln_1_bias, 1e-05, False);  transformer_h_0_ln_1_weight = transformer_h_0_ln_1_bias = None
    linear = torch.ops.aten.linear.default(layer_norm, transformer_h_0_attn_c_attn_weight, transformer_h_0_attn_c_attn_bias);  layer_norm = transformer_h_0_attn_c_attn_weight = transformer_h_0_attn_c_attn_bias = None
    split = torch.ops.aten.split.Tensor(linear, 64, 2);  linear = None
    getitem = split[0]
    getitem_1 = split[1]
    getitem_2 = split[2];  split = None
    view = torch.ops.aten.view.default(getitem_1, [sym_size_int_4, sym_size_int_5, 4, 16]);  getitem_1 = None
    transpose = torch.ops.aten.transpose.int(view, 1, 2);  view = None
    view_1 = torch.ops.aten.view.default(getitem, [sym_size_int_4, sym_size_int_5, 4, 16]);  getitem = None
    transpose_1 = torch.ops.aten.transpose.int(view_1, 1, 2);  view_1 = None
    view_2 = torch.ops.aten.view.default(getitem_2, [sym_size_int_4, sym_size_int_5, 4, 16]);  getitem_2 = None
    transpose_2 = torch.ops.aten.transpose.int(view_2, 1, 2);  view_2 = None
    scaled_dot_product_attention = torch.ops.aten.scaled_dot_product_attention.default(transpose_1, transpose, transpose_2, is_causal = True, scale = 0.25);  transpose_1 = transpose = transpose_2 = None
    transpose_4 = torch.ops.aten.transpose.int(scaled_dot_product_attention, 1, 2);  scaled_dot_product_attention = None
    contiguous = torch.ops.aten.contiguous.default(transpose_4);  transpose_4 = None
    view_3 = torch.ops.aten.view.default(contiguous, [sym_size_int_4, sym_size_int_5, 64]);  contiguous = None
    linear_1 = torch.ops.aten.linear.default(view_3, transformer_h_0_attn_c_proj_weight, transformer_h_0_attn_c_proj_bias);  view_3 = transformer_h_0_attn_c_proj_weight = transformer_h_0_attn_c_proj_bias = None
    dropout_2 = torch.ops.aten.dropout.default(linear_1, 0.0, False);  linear_1 = None
    add_1 = torch.ops.aten.add.Tensor(dropout, dropout_2);  dropout = dropout_2 = None
    layer_norm_1 = torch.ops.aten.layer_norm.default(add_1, [64], transformer_h_0_ln_2_weight, transformer_h_0_ln_2_bias, 1e-05, False);  transformer_h_0_ln_2_weight = transformer_h_0_ln_2_bias = None
    linear_2 = torch.ops.aten.linear.default(layer_norm_1, transformer_h_0_mlp_c_fc_weight, transformer_h_0_mlp_c_fc_bias);  layer_norm_1 = transformer_h_0_mlp_c_fc_weight = transformer_h_0_mlp_c_fc_bias = None
    gelu = torch.ops.aten.gelu.default(linear_2);  linear_2 = None
    linear_3 = torch.ops.aten.linear.default(gelu, transformer_h_0_mlp_c_proj_weight, transformer_h_0_mlp_c_proj_bias);  gelu = transformer_h_0_mlp_c_proj_weight = transformer_h_0_mlp_c_proj_bias = None
    dropout_3 = torch.ops.aten.dropout.default(linear_3, 0.0, False);  linear_3 = None
    add_2 = torch.ops.aten.add.Tensor(add_1, dropout_3);  add_1 = dropout_3 = None
    layer_norm_2 = torch.ops.aten.layer_norm.default(add_2, [64], transformer_h_1_ln_1_weight, transformer_h_1_ln_1_bias, 1e-05, False);  transformer_h_1_ln_1_weight = transformer_h_1_ln_1_bias = None
    linear_4 = torch.ops.aten.linear.default(layer_norm_2, transformer_h_1_attn_c_attn_weight, transformer_h_1_attn_c_attn_bias);  layer_norm_2 = transformer_h_1_attn_c_attn_weight = transformer_h_1_attn_c_attn_bias = None
    split_1 = torch.ops.aten.split.Tensor(linear_4, 64, 2);  linear_4 = None
    getitem_3 = split_1[0]
    getitem_4 = split_1[1]
    getitem_5 = split_1[2];  split_1 = None
    view_4 = torch.ops.aten.view.default(getitem_4, [sym_size_int_4, sym_size_int_5, 4, 16]);  getitem_4 = None
    transpose_5 = torch.ops.aten.transpose.int(view_4, 1, 2);  view_4 = None
    view_5 = torch.ops.aten.view.default(getitem_3, [sym_size_int_4, sym_size_int_5, 4, 16]);  getitem_3 = None
    transpose_6 = torch.ops.aten.transpose.int(view_5, 1, 2);  view_5 = None
    view_6 = torch.ops.aten.view.default(getitem_5, [sym_size_int_4, sym_size_int_5, 4, 16]);  getitem_5 = None
    transpose_7 = torch.ops.aten.transpose.int(view_6, 1, 2);  view_6 = None
    scaled_dot_product_attention_1 = torch.ops.aten.scaled_dot_product_attention.default(transpose_6, transpose_5, transpose_7, is_causal = True, scale = 0.25);  transpose_6 = transpose_5 = transpose_7 = None
    transpose_9 = torch.ops.aten.transpose.int(scaled_dot_product_attention_1, 1, 2);  scaled_dot_product_attention_1 = None
    contiguous_1 = torch.ops.aten.contiguous.default(transpose_9);  transpose_9 = None
    view_7 = torch.ops.aten.view.default(contiguous_1, [sym_size_int_4, sym_size_int_5, 64]);  contiguous_1 = sym_size_int_4 = sym_size_int_5 = None
    linear_5 = torch.ops.aten.linear.default(view_7, transformer_h_1_attn_c_proj_weight, transformer_h_1_attn_c_proj_bias);  view_7 = transformer_h_1_attn_c_proj_weight = transformer_h_1_attn_c_proj_bias = None
    dropout_5 = torch.ops.aten.dropout.default(linear_5, 0.0, False);  linear_5 = None
    add_3 = torch.ops.aten.add.Tensor(add_2, dropout_5);  add_2 = dropout_5 = None
    layer_norm_3 = torch.ops.aten.layer_norm.default(add_3, [64], transformer_h_1_ln_2_weight, transformer_h_1_ln_2_bias, 1e-05, False);  transformer_h_1_ln_2_weight = transformer_h_1_ln_2_bias = None
    linear_6 = torch.ops.aten.linear.default(layer_norm_3, transformer_h_1_mlp_c_fc_weight, transformer_h_1_mlp_c_fc_bias);  layer_norm_3 = transformer_h_1_mlp_c_fc_weight = transformer_h_1_mlp_c_fc_bias = None
    gelu_1 = torch.ops.aten.gelu.default(linear_6);  linear_6 = None
    linear_7 = torch.ops.aten.linear.default(gelu_1, transformer_h_1_mlp_c_proj_weight, transformer_h_1_mlp_c_proj_bias);  gelu_1 = transformer_h_1_mlp_c_proj_weight = transformer_h_1_mlp_c_proj_bias = None
    dropout_6 = torch.ops.aten.dropout.default(linear_7, 0.0, False);  linear_7 = None
    add_4 = torch.ops.aten.add.Tensor(add_3, dropout_6);  add_3 = dropout_6 = None
    layer_norm_4 = torch.ops.aten.layer_norm.default(add_4, [64], transformer_ln_f_weight, transformer_ln_f_bias, 1e-05, False);  add_4 = transformer_ln_f_weight = transformer_ln_f_bias = None
    linear_8 = torch.ops.aten.linear.default(layer_norm_4, lm_head_weight);  layer_norm_4 = lm_head_weight = None
    return pytree.tree_unflatten((linear_8,), self._out_spec)
